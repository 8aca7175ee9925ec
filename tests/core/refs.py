"""Independent references for the core quantization math.

* ``np_quantize`` / ``np_qdq``: the ONNX QuantizeLinear / DequantizeLinear definition written in numpy
  (float32 division, ``np.round`` = round half to even, saturate, ``(q - z) * s`` in float32).
* ``ort_qdq``: a two-node ONNX graph QuantizeLinear → DequantizeLinear executed by ONNX Runtime (CPU).
  Sessions are cached per (dtype, opset, layout, zero point): the zero point is an initializer because
  int4 / uint4 tensors cannot be fed from numpy; the scale is a graph input.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

# name -> (ONNX element type, lowest opset whose QuantizeLinear accepts it, signed, bits)
ONNX_QTYPES = {
    "int8": (TensorProto.INT8, 13, True, 8),
    "uint8": (TensorProto.UINT8, 13, False, 8),
    "int16": (TensorProto.INT16, 21, True, 16),
    "uint16": (TensorProto.UINT16, 21, False, 16),
    "int4": (TensorProto.INT4, 21, True, 4),
    "uint4": (TensorProto.UINT4, 21, False, 4),
}


def np_quantize(x, scale, zp, qmin, qmax):
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):  # huge x / s overflows to +-inf and then saturates, as in ONNX
        q = np.round(x / np.asarray(scale, np.float32)) + np.asarray(zp, np.int64)
    return np.clip(q, qmin, qmax).astype(np.int64)


def np_dequantize(q, scale, zp):
    return (np.asarray(q, np.int64) - np.asarray(zp, np.int64)).astype(np.float32) * np.asarray(scale, np.float32)


def np_qdq(x, scale, zp, qmin, qmax):
    return np_dequantize(np_quantize(x, scale, zp, qmin, qmax), scale, zp)


@functools.lru_cache(maxsize=None)
def _session(qtype: str, opset: int, ndim: int, axis: int | None, block: int | None, zp_shape, zp_values):
    elem = ONNX_QTYPES[qtype][0]
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block is not None:
        attrs["block_size"] = block
    s_shape = list(zp_shape)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * ndim),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, s_shape),
    ]
    zp = helper.make_tensor("z", elem, s_shape, list(zp_values))
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes, "qdq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * ndim)], initializer=[zp]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run Q and DQ as written
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_qdq(x, scale, zp, qtype: str, opset: int | None = None, axis: int | None = None, block: int | None = None):
    """QuantizeLinear → DequantizeLinear in ONNX Runtime.

    Per-tensor: scalar ``scale``/``zp``. Per-axis: 1-D ``scale``/``zp`` and ``axis``. Blocked (opset 21):
    ``scale``/``zp`` shaped like ``x`` with ``ceil(n / block)`` along ``axis``.
    """
    x = np.ascontiguousarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp, np.int64)
    opset = opset or ONNX_QTYPES[qtype][1]
    sess = _session(qtype, opset, x.ndim, axis, block, tuple(zp.shape), tuple(int(v) for v in zp.ravel()))
    return sess.run(None, {"x": x, "s": scale})[0]
