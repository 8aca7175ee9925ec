"""ONNX export of dynamically quantized models, and running models with integer (token id) inputs.

``export_dynamic_onnx`` traces a model made by ``quantize_dynamic_``: every dynamic product becomes
``DynamicQuantizeLinear → MatMulInteger → Cast → Mul → Add`` (per tensor; ONNX Runtime fuses it into
``DynamicQuantizeMatMul``) with int8 weight initializers, recurrent layers unrolled over the example's
sequence length. The same helper exports any float or fake-quantized model whose input is not float
(e.g. the token ids of ``minilm-l6``): inputs keep their dtype on the way to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from lowbit.device import on_cpu
from lowbit.export.onnx_static import DEFAULT_OPSET, atomic_write_bytes, export_mode
from lowbit.export.runtime import ParityResult, make_session, parity, run_session
from lowbit.nn.dynamic import DynamicMixin

log = logging.getLogger(__name__)

@contextlib.contextmanager
def dynamic_export_mode(model: nn.Module):
    """Switch dynamic layers (and any static quantizers) to their ONNX form for the block."""
    mods = [m for m in model.modules() if isinstance(m, DynamicMixin)]
    for m in mods:
        m.refresh_codes()
        m.prepare_codes()  # integer codes as constants, computed before tracing (never traced as ops)
        m.export_mode = True
    try:
        with export_mode(model):
            yield model
    finally:
        for m in mods:
            m.export_mode = False


def trace_to_onnx(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET,
                  custom_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    """Trace ``model`` (quantized layers in ONNX form) with input ``input`` / output ``output``, dynamic batch."""
    buf = io.BytesIO()
    model.eval()
    with dynamic_export_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True, custom_opsets=custom_opsets or {},
        )
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    proto.producer_name = "lowbit"
    return proto


def export_dynamic_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = DEFAULT_OPSET,
                        check_parity: bool = True) -> Path:
    """Write ``model`` (from ``quantize_dynamic_``, or a float model) to ``path`` atomically.

    Args:
        check_parity: run the file on ONNX Runtime with ``example`` and compare with the PyTorch simulation;
            a disagreement is logged as a warning.
    """
    path = Path(path)
    model, example = on_cpu(model), example.cpu()  # traced on the CPU; the caller's model stays put
    proto = trace_to_onnx(model, example, opset)
    atomic_write_bytes(path, proto.SerializeToString())
    log.info("wrote %s (%d nodes)", path, len(proto.graph.node))
    if check_parity and any(isinstance(m, DynamicMixin) for m in model.modules()):
        result = check_parity_any(model, path, example)
        if not result.ok:
            log.warning("%s: ONNX Runtime and the simulation agree within one output step on only %.2f%% of "
                        "elements", path, 100 * result.fraction_within_step)
    return path


run_onnx = run_session  # kept for callers: runtime.run_session feeds the dtype the session declares


def run_onnx_batched(session: ort.InferenceSession, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``run_onnx`` over ``x`` in batches."""
    return torch.cat([run_onnx(session, chunk) for chunk in torch.split(x, batch_size)])


def check_parity_any(model: nn.Module, path: str | Path, inputs: torch.Tensor, threads: int = 2,
                     step: float | None = None) -> ParityResult:
    """``export.runtime.parity`` of ONNX Runtime running ``path`` and ``model`` on ``inputs`` (any input dtype)."""
    model, inputs = on_cpu(model), inputs.cpu()
    engine = run_onnx_batched(make_session(path, threads), inputs)
    with torch.no_grad():
        sim = torch.cat([model(chunk) for chunk in torch.split(inputs, 32)])
    return parity(sim, engine, step)

