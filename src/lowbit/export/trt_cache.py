"""TensorRT calibration cache (the text format of TensorRT's implicit-INT8 calibrators).

First line ``TRT-<version>-EntropyCalibration2``, then one ``<tensor name>: <hex>`` line per tensor where
``<hex>`` is the big-endian IEEE-754 bit pattern of the float32 scale ``amax / 127``. Tensor names are
the activation tensors of the exported graph (the inputs of its QuantizeLinear nodes), which are the
same names as in the FP32 export of the same prepared model.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import onnx
from onnx import numpy_helper

from lowbit.export.onnx_static import atomic_write_bytes

log = logging.getLogger(__name__)

HEADER = "TRT-100100-EntropyCalibration2"


def _constants(model: onnx.ModelProto) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Tensor name → scale of every activation QuantizeLinear (per-tensor, zero-point 0)."""
    consts = _constants(model)
    scales: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts:
            continue
        scale = consts.get(node.input[1])
        zp = consts.get(node.input[2]) if len(node.input) > 2 else None
        if scale is None or scale.size != 1:
            raise ValueError(f"QuantizeLinear on {node.input[0]}: TensorRT cache needs a constant per-tensor scale")
        if zp is not None and int(zp.reshape(-1)[0]) != 0:
            raise ValueError(f"QuantizeLinear on {node.input[0]}: TensorRT needs symmetric (zero-point 0) activations")
        scales[node.input[0]] = float(scale.reshape(-1)[0])
    return scales


def format_cache(scales: dict[str, float]) -> str:
    """Cache text for ``scales`` (name → float32 scale)."""
    lines = [HEADER]
    for name, scale in scales.items():
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def parse_cache(text: str) -> dict[str, float]:
    """Inverse of :func:`format_cache`."""
    out = {}
    for line in text.splitlines()[1:]:
        if line.strip():
            name, _, hexval = line.rpartition(": ")
            out[name] = struct.unpack(">f", bytes.fromhex(hexval))[0]
    return out


def write_trt_calibration_cache(int8_onnx: str | Path, path: str | Path) -> dict[str, float]:
    """Write the TensorRT calibration cache for the activations of an exported INT8 model."""
    scales = activation_scales(onnx.load(str(int8_onnx)))
    atomic_write_bytes(Path(path), format_cache(scales).encode())
    log.info("wrote TensorRT calibration cache with %d tensors to %s", len(scales), path)
    return scales
