"""Clean an exported ONNX graph with onnxscript's optimizer before it is written.

The TorchScript exporter leaves every ``F.pad`` traced with a dynamic batch axis as a
ConstantOfShape / Concat / Reshape / Slice / Transpose / Cast subgraph that computes a constant ``pads``
tensor, and every ``torch.flatten`` as a ``Flatten``. ``clean_onnx`` runs onnxscript's maintained optimizer
(``onnxscript.optimizer.optimize_ir``: constant folding, its default rewrite rules — ``Pad`` fused into
``Conv``, ``Flatten`` → ``Reshape`` —, dead-node removal, initializer deduplication) on the file, with two
settings of ours:

* ``ConstantOfShape`` is folded (onnxscript keeps it by default, which leaves the pad subgraphs whole).
* ``QuantizeLinear`` / ``DequantizeLinear`` are never folded (onnxscript's default), nor is a node feeding a
  ``DequantizeLinear`` (the ``Cast`` that widens packed int4 weights to int8 for ONNX Runtime's kernels): the
  integer weight initializers and their ``DequantizeLinear`` stay, so the file stays ~4x smaller.

One rewrite rule of ours, written with onnxscript's pattern API: a zero ``Pad`` in front of a per-tensor
``QuantizeLinear → DequantizeLinear`` pair is moved behind the pair (``DQ(Q(Pad(x, 0)))`` ≡
``Pad(DQ(Q(x)), 0)`` exactly, since ``DQ(Q(0)) = (zp - zp)·s = 0``), so the ``Pad`` lands right before its
``Conv`` and is fused into the ``Conv``'s ``pads``, as in ONNX Runtime's own pre-processed files. The quantized
tensor then is the ``Pad``'s input, which the FP32 file (where the ``Pad`` is fused too) still has.

Tensor names of values that survive (the ``input`` / ``output`` names, every activation a
``QuantizeLinear`` reads) are kept, and so is the dynamic batch axis.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnxscript import ir, rewriter
from onnxscript.optimizer import optimize_ir
from onnxscript.rewriter import pattern as orp
from onnxscript.rewriter.rules.common import fuse_pad_into_conv_rule, normalize_pad_format_conv_rule

log = logging.getLogger(__name__)

FOLD_ALWAYS = ("ConstantOfShape",)
FOLD_ALWAYS_MAX_ELEMENTS = 4096  # a pads vector, not a large zero tensor that would bloat the file


def _feeds_dequantize(node: ir.Node) -> bool:
    return any(user.op_type == "DequantizeLinear" for out in node.outputs for user, _ in out.uses())


def _should_fold(node: ir.Node) -> bool | None:
    """Keep what feeds a ``DequantizeLinear`` (the int4 → int8 ``Cast`` of packed weights), fold a small
    constant ``ConstantOfShape`` (a pads computation); everything else follows onnxscript's defaults."""
    if _feeds_dequantize(node):
        return False
    if node.domain in ("", "ai.onnx") and node.op_type in FOLD_ALWAYS:
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        if shape is not None and int(np.prod(shape.numpy())) <= FOLD_ALWAYS_MAX_ELEMENTS:
            return True
    return None


def _is_zero_constant_pad(pad_node: ir.Node) -> bool:
    mode = pad_node.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return False
    if pad_node.inputs[1] is None or pad_node.inputs[1].const_value is None:
        return False
    value = pad_node.inputs[2] if len(pad_node.inputs) > 2 else None
    return value is None or (value.const_value is not None and not np.any(value.const_value.numpy()))


class QuantizeBeforeZeroPad(orp.RewriteRuleClassBase):
    """``DQ(Q(Pad(x, 0)))`` → ``Pad(DQ(Q(x)), 0)`` for per-tensor Q/DQ whose intermediate values have one user."""

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, scale, zero_point, dq_scale, dq_zero_point):
        padded = op.Pad(x, _allow_other_inputs=True, _outputs=["padded"])
        codes = op.QuantizeLinear(padded, scale, zero_point, _allow_other_attributes=True, _outputs=["codes"])
        return op.DequantizeLinear(codes, dq_scale, dq_zero_point, _allow_other_attributes=True, _outputs=["value"])

    def check(self, context, x, scale, zero_point, dq_scale, dq_zero_point, padded, codes, value) -> orp.MatchResult:
        del context, x, zero_point, dq_zero_point, value
        result = orp.MatchResult()
        if len(padded.uses()) != 1 or len(codes.uses()) != 1:
            return result.fail("the padded tensor or its codes have other users")
        if not _is_zero_constant_pad(padded.producer()):
            return result.fail("not a constant Pad with value 0 and constant pads")
        for s in (scale, dq_scale):
            if s.const_value is None or s.const_value.size != 1:
                return result.fail("scale is not a constant scalar (per-tensor)")
        return result

    def rewrite(self, op, x, scale, zero_point, dq_scale, dq_zero_point, padded, codes, value):
        pad_node, q_node, dq_node = padded.producer(), codes.producer(), value.producer()
        q = op.op("QuantizeLinear", x, scale, zero_point, _name=q_node.name, **q_node.attributes.copy())
        dq = op.op("DequantizeLinear", q, dq_scale, dq_zero_point, _name=dq_node.name, **dq_node.attributes.copy())
        return op.op("Pad", dq, *pad_node.inputs[1:], _name=pad_node.name, **pad_node.attributes.copy())


PAD_RULES = orp.RewriteRuleSet([QuantizeBeforeZeroPad.rule(), normalize_pad_format_conv_rule, fuse_pad_into_conv_rule])


def clean_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, pad fusion and dead-node removal (see the module docstring); returns a new model.

    Raises:
        ValueError: the cleaned graph lost a graph input / output name or a ``QuantizeLinear`` / weight
            ``DequantizeLinear`` of the original (it must never: Q/DQ are not folded).
    """
    before = Counter(n.op_type for n in proto.graph.node)
    model = ir.serde.deserialize_model(proto)
    optimize_ir(model, should_fold=_should_fold)
    model = rewriter.rewrite(model, pattern_rewrite_rules=PAD_RULES)
    optimize_ir(model, should_fold=_should_fold)  # fold / fuse what the pad move exposed
    out = ir.serde.serialize_model(model)
    _check_kept(proto, out)
    after = Counter(n.op_type for n in out.graph.node)
    log.info("cleaned ONNX graph: %d → %d nodes (%s)", sum(before.values()), sum(after.values()),
             ", ".join(f"{k} {before[k]}→{after[k]}" for k in sorted(before | after) if before[k] != after[k]))
    return out


def _check_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    for what in ("input", "output"):
        old = [v.name for v in getattr(before.graph, what)]
        new = [v.name for v in getattr(after.graph, what)]
        if old != new:
            raise ValueError(f"ONNX cleaning changed the graph {what}s {old} to {new}")
    old, new = _weight_dequantizers(before), _weight_dequantizers(after)
    if new < old - _dropped_duplicates(before, "DequantizeLinear"):
        raise ValueError(f"ONNX cleaning removed weight DequantizeLinear nodes ({old} → {new})")
    q_old, q_new = (sum(n.op_type == "QuantizeLinear" for n in m.graph.node) for m in (before, after))
    if q_new < q_old - _dropped_duplicates(before, "QuantizeLinear"):
        log.info("ONNX cleaning removed %d QuantizeLinear nodes whose output nothing read", q_old - q_new)


def _weight_dequantizers(model: onnx.ModelProto) -> int:
    """``DequantizeLinear`` nodes of constant integer tensors (weights, biases): they must all survive."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in consts for n in model.graph.node)


def _dropped_duplicates(model: onnx.ModelProto, op_type: str) -> int:
    """How many ``op_type`` nodes repeat another's inputs and attributes (common-subexpression elimination)."""
    keys = [(tuple(n.input), n.domain, tuple(a.SerializeToString() for a in n.attribute))
            for n in model.graph.node if n.op_type == op_type]
    return len(keys) - len(set(keys))
