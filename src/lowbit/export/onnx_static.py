"""ONNX export with QuantizeLinear / DequantizeLinear.

Activations become ``Q → DQ`` pairs on the tensors our quantizers sit on; weights become integer
initializers behind a ``DQ`` (int8, per-channel axis where needed), biases int32 initializers with
``s_b = s_in · s_w`` — the QDQ form ONNX Runtime fuses into QLinearConv / QLinearMatMul and TensorRT's
explicit quantization accepts. Tensors of ≤ 4 bits or with per-group qparams need opset 21 (int4 / uint4 codes
packed two per byte, ``block_size``): see ``export.onnx_int4``. Files are written atomically (temporary
file + rename).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from lowbit.device import on_cpu
from lowbit.export.onnx_int4 import INT8_OPSET, TORCH_MAX_OPSET, finalize_lowbit, resolve_opset
from lowbit.export.optimize import clean_onnx
from lowbit.export.runtime import ParityResult, make_session, run_session
from lowbit.export.segment_parity import parity_with_segments
from lowbit.nn import QuantLayerMixin, TensorQuantizer, quantizers_disabled  # noqa: F401 (re-exported)
from lowbit.nn import export_form as export_mode  # noqa: F401 (the name export callers use)

log = logging.getLogger(__name__)

DEFAULT_OPSET = INT8_OPSET


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_onnx_model(model: nn.Module, example_input: torch.Tensor, opset: int | None = None,
                  clean: bool = True) -> onnx.ModelProto:
    """Trace ``model`` (quantizers in ONNX form) into an in-memory ONNX model with a dynamic batch axis.

    ``opset`` None picks 21 when a tensor needs int4 / uint4 or blocks, else 17 (see ``onnx_int4.resolve_opset``).
    ``clean``: constant folding and pad fusion with onnxscript's optimizer (``export.optimize.clean_onnx``).
    """
    opset = resolve_opset(model, opset)
    buf = io.BytesIO()
    model.eval()
    with export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example_input,), buf, dynamo=False, opset_version=min(opset, TORCH_MAX_OPSET),
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, do_constant_folding=True,
        )
    proto = onnx.load_model_from_string(buf.getvalue())
    finalize_lowbit(proto, opset)
    if clean:
        proto = clean_onnx(proto)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    target: str = "onnxruntime",
    opset: int | None = None,
    float_model: bool = False,
    check_parity: bool = True,
    clean: bool = True,
) -> Path:
    """Export a converted model to ONNX with Q/DQ nodes (or in float with ``float_model=True``).

    Args:
        model: a prepared, calibrated and converted model.
        example_input: one input batch (its batch size becomes dynamic).
        path: output ``.onnx`` file (written atomically).
        target: ``onnxruntime`` or ``tensorrt``; a ``tensorrt`` export also needs ``write_trt_calibration_cache``.
        opset: ONNX opset, 13..21; None: 21 when a tensor has ≤ 4 bits (int4 / uint4, packed) or per-group
            qparams (``block_size``), else 17. Below 21, ≤ 4-bit per-tensor / per-channel codes stay in int8
            containers (what QLinearConv needs); per-group ones are refused.
        float_model: export with every quantizer disabled (the FP32 baseline of the same graph).
        check_parity: run the written INT8 file on ONNX Runtime with ``example_input`` and compare with the
            PyTorch simulation (``export.runtime.check_parity``); a failure is logged as a warning.
        clean: fold constants and fuse pads with onnxscript's optimizer (``export.optimize.clean_onnx``);
            False writes the graph as the TorchScript exporter traced it.

    Returns:
        the written path.
    """
    if target not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown export target {target!r}; use onnxruntime or tensorrt")
    path = Path(path)
    model, example_input = on_cpu(model), example_input.cpu()  # traced on the CPU; the caller's model stays put
    ctx = quantizers_disabled(model) if float_model else contextlib.nullcontext()
    with ctx:
        proto = to_onnx_model(model, example_input, opset, clean)  # checks opset (resolve_opset)
    proto.producer_name = "lowbit"
    atomic_write_bytes(path, proto.SerializeToString())
    log.info("wrote %s (%d nodes)", path, len(proto.graph.node))
    if check_parity and not float_model:
        result = check_onnx_parity(model, path, example_input)
        if not result.ok:
            log.warning("%s: ONNX Runtime and the PyTorch simulation agree within one output step on only "
                        "%.2f%% of elements", path, 100 * result.fraction_within_step)
    return path


def check_onnx_parity(model: nn.Module, path: str | Path, inputs: torch.Tensor, threads: int = 2) -> ParityResult:
    """Run ``inputs`` through the exported file on ONNX Runtime and through ``model``; compare within one output
    step, and tensor by tensor when that fails (``export.segment_parity.parity_with_segments``)."""
    model, inputs = on_cpu(model), inputs.cpu()
    engine = run_session(make_session(path, threads), inputs)
    with torch.no_grad():
        sim = model(inputs)
    return parity_with_segments(model, path, inputs, sim, engine, threads)
