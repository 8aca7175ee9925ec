"""Opset-21 low-bit ONNX: int4 / uint4 codes packed two per byte, and blocked (per-group) DequantizeLinear.

torch.onnx's TorchScript exporter stops at opset 20 and has no int4 tensor type. lowbit therefore exports
≤ 4-bit and per-group weights as placeholder nodes of the ``lowbit`` domain (``nn.onnx_ops.DQLowBit``; the
codes travel as int8 / uint8) and :func:`finalize_lowbit` rewrites the traced model:

* opset 21: weight codes and zero-points become INT4 / UINT4 initializers, two codes per byte (``n`` codes
  take ``ceil(n / 2)`` bytes; 2- and 3-bit codes use the same containers, ONNX having nothing narrower):

  - layer input quantized, per-tensor / per-channel weight: ``DequantizeLinear(Cast(codes → int8))``.
    ONNX Runtime folds the Cast when it loads the model and runs QLinearConv / QLinearMatMul as for INT8;
  - weight-only (input float) or per-group: ``DequantizeLinear`` of the INT4 / UINT4 codes (``axis``,
    ``block_size``). A Linear whose weight is blocked along its input dimension, ``Gemm(x, DQ(W), b,
    transB=1)`` or ``MatMul(x, Transpose(DQ(W)))``, becomes ``MatMul(x, DQ(Wᵀ)) (+ b)``: the form ONNX
    Runtime fuses into its 4-bit ``MatMulNBits`` kernel.
* opset 13..20: the same codes in int8 / uint8 containers with standard Q/DQ nodes (per-tensor and
  per-channel only; blocks need opset 21). ONNX Runtime then fuses QLinearConv / QLinearMatMul as for INT8.

Opset 20 → 21 only widens type lists (int4 / uint4) and adds ``block_size`` / ``output_dtype`` to Q/DQ, so
the opset-20 trace is valid at opset 21 unchanged; only the opset number and IR version are raised.

What ONNX Runtime 1.32 (CPU) executes: QLinearConv / QLinearMatMul for the Cast form; DequantizeLinear on
the int4 weight at every run + float Conv / Gemm for weight-only per-channel weights; MatMulNBits for blocked
Linear weights (K ≥ 16, unless a ReLU right after lets Gemm+Relu fusion win), which by default quantizes its
*activations* to int8 per block (session option ``session.qdq_matmulnbits_accuracy_level``, default 4; "1"
keeps float32 and matches the simulation to ~1e-6).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from lowbit.nn import QuantLayerMixin
from lowbit.nn.onnx_ops import LOWBIT_DOMAIN, needs_lowbit_form

log = logging.getLogger(__name__)

INT8_OPSET = 17  # exports without int4 / blocks (``onnx_static.DEFAULT_OPSET``)
LOWBIT_OPSET = 21  # first opset with int4 / uint4 and DequantizeLinear block_size
TORCH_MAX_OPSET = 20  # highest opset of torch.onnx's TorchScript exporter
MIN_OPSET = 13  # per-channel QuantizeLinear
MIN_IR_VERSION = 10  # int4 / uint4 and opset 21
FOUR_BIT_TYPES = {onnx.TensorProto.INT4: True, onnx.TensorProto.UINT4: False}  # ONNX type -> signed


def lowbit_weights(model: nn.Module) -> list[tuple[str, bool]]:
    """``(layer name, blocked)`` of every active weight quantizer that needs opset 21 (≤ 4 bits or per-group)."""
    out = []
    for layer in model.modules():
        q = getattr(layer, "weight_quantizer", None)
        if isinstance(layer, QuantLayerMixin) and q.is_active and needs_lowbit_form(q.spec.bits, q.onnx_block_size()):
            out.append((layer.layer_name, q.onnx_block_size() is not None))
    return out


def resolve_opset(model: nn.Module, opset: int | None) -> int:
    """The export opset: ``opset`` if given (checked), else 21 when any tensor needs int4 / blocks, else 17.

    Raises:
        ValueError: opset outside [13, 21], or below 21 while a weight is per-group (blocked), naming the layer.
    """
    lowbit = lowbit_weights(model)
    if opset is None:
        return LOWBIT_OPSET if lowbit else INT8_OPSET
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET} cannot express per-channel QuantizeLinear")
    if opset > LOWBIT_OPSET:
        raise ValueError(f"opset {opset} is not supported: lowbit exports opsets {MIN_OPSET} to {LOWBIT_OPSET}")
    blocked = [name for name, is_blocked in lowbit if is_blocked]
    if opset < LOWBIT_OPSET and blocked:
        raise ValueError(f"layer {blocked[0]}: per-group weights need opset >= {LOWBIT_OPSET} "
                         f"(DequantizeLinear block_size), got opset {opset}")
    if opset < LOWBIT_OPSET and lowbit:
        log.info("opset %d: %d weights of <= 4 bits stay in int8 containers (not packed)", opset, len(lowbit))
    return opset


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Constants (initializers and Constant nodes), producers and consumers of one ONNX graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.domain == ""}
        self.names = {v for n in graph.node for v in itertools.chain(n.input, n.output)} | set(self.inits)
        self._counter = itertools.count()

    def tensor(self, name: str) -> onnx.TensorProto | None:
        """A constant tensor (initializer or Constant node), or None when ``name`` is computed at run time."""
        if name in self.inits:
            return self.inits[name]
        node = self.const_nodes.get(name)
        if node is None or node.attribute[0].name != "value":
            return None
        return node.attribute[0].t

    def array(self, name: str) -> np.ndarray | None:
        """Value of a constant tensor (4-bit codes widened to int8 / uint8), or None at run time."""
        t = self.tensor(name)
        if t is None:
            return None
        values = numpy_helper.to_array(t)
        if t.data_type in FOUR_BIT_TYPES:
            values = values.astype(np.int8 if FOUR_BIT_TYPES[t.data_type] else np.uint8)
        return values

    def fresh(self, base: str) -> str:
        """A tensor name not used anywhere in the graph."""
        while True:
            name = f"{base}_{next(self._counter)}"
            if name not in self.names:
                self.names.add(name)
                return name

    def add_init(self, tensor: onnx.TensorProto) -> str:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = tensor
        return tensor.name

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if name in n.input]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return next((n for n in self.graph.node if name in n.output), None)

    def prune(self) -> None:
        """Drop initializers and Constant nodes that nothing reads any more."""
        used = {v for n in self.graph.node for v in n.input} | {o.name for o in self.graph.output}
        for node in [n for n in self.graph.node if n.op_type == "Constant" and n.output[0] not in used]:
            self.graph.node.remove(node)
        for tensor in [t for t in self.graph.initializer if t.name not in used]:
            self.graph.initializer.remove(tensor)
        self.inits = {t.name: t for t in self.graph.initializer}


def packed_tensor(name: str, codes: np.ndarray, signed: bool) -> onnx.TensorProto:
    """INT4 (signed, [-8, 7]) or UINT4 ([0, 15]) initializer, two codes per byte, first code in the low nibble.

    Raises:
        ValueError: a code outside the 4-bit range.
    """
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{name}: codes in [{codes.min()}, {codes.max()}] do not fit {'int4' if signed else 'uint4'}")
    nibbles = (codes.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    dtype = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return helper.make_tensor(name, dtype, codes.shape, packed.tobytes(), raw=True)


def _pack_input(g: _Graph, node: onnx.NodeProto, index: int, signed: bool) -> None:
    """Replace constant input ``index`` of ``node`` by a packed copy (other readers keep the original)."""
    values = g.array(node.input[index])
    if values is None:
        raise ValueError(f"node {node.name}: input {node.input[index]!r} of a low-bit weight is not a constant")
    node.input[index] = g.add_init(packed_tensor(g.fresh(f"{node.name or 'dq'}_{index}"), values, signed))


def _rewrite_node(g: _Graph, node: onnx.NodeProto, packed: bool) -> None:
    """One ``lowbit::DequantizeLinear`` placeholder → standard nodes (int4 / uint4 when ``packed``).

    Packed: a blocked or weight-only DQ reads INT4 / UINT4 codes and zero-point directly; a weight whose layer
    also quantizes its input reads ``Cast(packed codes → int8)`` with an int8 zero-point instead, so that
    ONNX Runtime, which folds that Cast when it loads the model, still fuses QLinearConv / QLinearMatMul
    (it runs no integer kernel on int4 weights, and fuses a uint4 *activation* into an invalid graph).
    """
    a = _attrs(node)
    if not packed and "block_size" in a:
        raise ValueError(f"node {node.name}: per-group quantization needs opset >= {LOWBIT_OPSET}")
    del node.attribute[:]
    node.domain = ""
    node.attribute.extend(helper.make_attribute(k, a[k]) for k in ("axis", "block_size") if k in a)
    if not packed:
        return
    signed = bool(a["signed"])
    if a.get("integer_kernel") and "block_size" not in a:
        _unpack_on_load(g, node, signed)
        return
    for index in range(0, len(node.input), 2):  # codes and zero-point (the scale, input 1, stays float)
        _pack_input(g, node, index, signed)


def _unpack_on_load(g: _Graph, node: onnx.NodeProto, signed: bool) -> None:
    """Packed codes → ``Cast`` to int8 / uint8 → the DQ (int8 zero-point kept): ONNX Runtime folds the Cast of
    a constant when it loads the model, so the weight is int8 again and QLinearConv / QLinearMatMul fuse."""
    packed = g.add_init(packed_tensor(g.fresh(f"{node.name or 'dq'}_packed"), g.array(node.input[0]), signed))
    wide = g.fresh(f"{node.name or 'dq'}_int8")
    to = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
    cast = helper.make_node("Cast", [packed], [wide], name=f"{node.name}_unpack", to=to)
    g.graph.node.insert(list(g.graph.node).index(node), cast)
    node.input[0] = wide


def _transpose_blocked_dq(g: _Graph, dq: onnx.NodeProto) -> bool:
    """Turn a 2-D DQ blocked along axis 1 (``W[N, K]``) into one blocked along axis 0 (``Wᵀ[K, N]``)."""
    a = _attrs(dq)
    if a.get("axis") != 1 or "block_size" not in a or any(g.array(i) is None for i in dq.input):
        return False
    if g.array(dq.input[0]).ndim != 2:
        return False
    for i, name in enumerate(dq.input):
        values, new = np.ascontiguousarray(g.array(name).T), g.fresh(f"{name}_t")
        kind = g.tensor(name).data_type
        if kind in FOUR_BIT_TYPES:
            dq.input[i] = g.add_init(packed_tensor(new, values, FOUR_BIT_TYPES[kind]))
        else:
            dq.input[i] = g.add_init(numpy_helper.from_array(values, new))
    dq.attribute.remove(next(x for x in dq.attribute if x.name == "axis"))
    dq.attribute.append(helper.make_attribute("axis", 0))
    for info in [v for v in g.graph.value_info if v.name == dq.output[0]]:
        g.graph.value_info.remove(info)  # the traced shape [N, K] is now [K, N]
    return True


def _blocked_dq_feeding(g: _Graph, name: str) -> onnx.NodeProto | None:
    dq = g.producer(name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or len(g.consumers(name)) != 1:
        return None
    return dq


def _gemm_to_matmul(g: _Graph, gemm: onnx.NodeProto) -> bool:
    """``Gemm(x, DQ(W[N,K]), c, transB=1)`` → ``MatMul(x, DQ(Wᵀ)) + c`` when ``W`` is blocked along K."""
    a = _attrs(gemm)
    if a.get("transA", 0) != 0 or a.get("transB", 0) != 1 or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        return False
    dq = _blocked_dq_feeding(g, gemm.input[1])
    if dq is None or not _transpose_blocked_dq(g, dq):
        return False
    out = gemm.output[0]
    nodes = list(g.graph.node)
    at = nodes.index(gemm)
    mm_out = g.fresh(f"{gemm.name or 'gemm'}_matmul") if len(gemm.input) > 2 and gemm.input[2] else out
    new = [helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [mm_out], name=f"{gemm.name}_MatMul")]
    if mm_out != out:
        new.append(helper.make_node("Add", [mm_out, gemm.input[2]], [out], name=f"{gemm.name}_Add"))
    g.graph.node.remove(gemm)
    for k, n in enumerate(new):
        g.graph.node.insert(at + k, n)
    return True


def _transpose_to_dq(g: _Graph, tr: onnx.NodeProto) -> bool:
    """``MatMul(x, Transpose(DQ(W[N,K])))`` → ``MatMul(x, DQ(Wᵀ))`` when ``W`` is blocked along K."""
    if list(_attrs(tr).get("perm", [])) != [1, 0] or any(o.name == tr.output[0] for o in g.graph.output):
        return False
    dq = _blocked_dq_feeding(g, tr.input[0])
    if dq is None or not _transpose_blocked_dq(g, dq):
        return False
    for consumer in g.consumers(tr.output[0]):
        for i, name in enumerate(consumer.input):
            if name == tr.output[0]:
                consumer.input[i] = dq.output[0]
    g.graph.node.remove(tr)
    return True


def finalize_lowbit(proto: onnx.ModelProto, opset: int) -> int:
    """Rewrite the ``lowbit::`` placeholders of a traced model for ``opset`` (in place); returns their count.

    At opset 21 codes and zero-points become packed INT4 / UINT4 initializers and blocked Linear weights are
    laid out for ``MatMulNBits`` (see the module docstring); below, the codes keep int8 / uint8 containers.
    The model's default-domain opset becomes ``opset`` and, at 21, its IR version at least 10.
    """
    g = _Graph(proto.graph)
    packed = opset >= LOWBIT_OPSET
    placeholders = [n for n in proto.graph.node if n.domain == LOWBIT_DOMAIN]
    unknown = [n.op_type for n in placeholders if n.op_type != "DequantizeLinear"]
    if unknown:
        raise ValueError(f"unknown {LOWBIT_DOMAIN}:: node {unknown[0]!r} in the traced model")
    for node in placeholders:
        _rewrite_node(g, node, packed)
    if packed:
        for node in [n for n in proto.graph.node if n.op_type == "Gemm"]:
            _gemm_to_matmul(g, node)
        for node in [n for n in proto.graph.node if n.op_type == "Transpose"]:
            _transpose_to_dq(g, node)
    g.prune()
    imports = [o for o in proto.opset_import if o.domain not in ("", LOWBIT_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *imports])
    if packed:
        proto.ir_version = max(proto.ir_version, MIN_IR_VERSION)
    return len(placeholders)
