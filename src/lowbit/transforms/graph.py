"""Graph capture (torch.fx): find every op an all-int8 graph quantizes and put quantizers on its inputs.

Module swap alone cannot see ``x + y``, ``torch.cat`` or ``a @ b``; the traced graph can. The pass:

1. collects *sites*: Conv/Linear modules, residual adds, concats, matmuls and pools, each with the tensors
   it consumes and the specs the recipe gives it;
2. puts ONE quantizer on each consumed tensor (shared by every quantized consumer with the same spec, so
   the exported graph has one Q/DQ pair per tensor and ONNX Runtime can fuse producer and consumer);
3. gives the quantizer its producer's known range: after ReLU the tensor is non-negative (unsigned codes on
   ONNX Runtime), after ReLU6 its range is clipped to [0, 6].
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantSpec
from lowbit.nn import QUANT_MODULES, QuantLayerMixin, Requantize, TensorQuantizer, unsigned_variant
from lowbit.nn.functional import QuantAdd, QuantHardSigmoid
from lowbit.transforms.engine_ops import ELEMENTWISE_KINDS, elementwise_kind
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

FUNCTION_KINDS = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    torch.cat: "cat", torch.concat: "cat",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    F.adaptive_avg_pool2d: "pool", F.avg_pool2d: "pool",
}
METHOD_KINDS = {"add": "add", "matmul": "matmul"}
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)
# Ops that only move data (or pad with zeros, which is exactly representable; or take a maximum, which commutes
# with a monotonic quantizer): a quantizer on their output is placed on their input instead, so the engine sees
# ``producer → Q → DQ → pad/flatten/max pool → consumer``, fuses the producer (and folds the pad into the conv),
# and runs a max pool on the codes when the same quantizer is re-applied after it (``nn.Requantize``).
PASS_MODULES = (nn.ZeroPad2d, nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d)
PASS_FUNCTIONS = (torch.flatten, F.dropout, torch.dropout, torch.reshape, torch.clone, F.max_pool1d, F.max_pool2d,
                  torch.max_pool1d, torch.max_pool2d)
PASS_METHODS = ("flatten", "view", "reshape", "contiguous")
FLOAT_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", torch.sigmoid: "sigmoid", F.softmax: "softmax",
                   torch.softmax: "softmax", F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh",
                   F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm", F.hardswish: "hardswish",
                   F.hardsigmoid: "hardsigmoid", torch.batch_norm: "batch_norm", F.batch_norm: "batch_norm",
                   F.scaled_dot_product_attention: "scaled_dot_product_attention"}


@dataclass
class Site:
    """An op whose inputs are quantized."""

    name: str
    kind: str
    node: fx.Node
    inputs: list[fx.Node]
    weight: QuantSpec | None = None
    input: QuantSpec | None = None


@dataclass
class GraphPlan:
    """What the pass found: quantized sites, shared activation quantizers, and what stays float (and why)."""

    sites: list[Site] = field(default_factory=list)
    float_layers: list[tuple[str, str]] = field(default_factory=list)


def _tensor_args(node: fx.Node, kind: str) -> list[fx.Node]:
    if kind == "cat":
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in seq if isinstance(a, fx.Node)]
    args = list(node.args[:2]) if kind in ("add", "matmul", "mul") else list(node.args[:1])
    return [a for a in args if isinstance(a, fx.Node) and a.op != "get_attr"]


def _classify(gm: fx.GraphModule, node: fx.Node, target: str = "onnxruntime") -> tuple[str, str] | None:
    """``(layer name, type name)`` of a quantizable node, or None."""
    if target == "onnxruntime":
        kind = elementwise_kind(gm, node)
        if kind is not None:
            return (str(node.target) if node.op == "call_module" else node.name), kind
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) in QUANT_MODULES:
            return str(node.target), type(mod).__name__
        if isinstance(mod, POOL_MODULES):
            return str(node.target), "pool"
    elif node.op == "call_function" and node.target in FUNCTION_KINDS:
        kind = FUNCTION_KINDS[node.target]
        return (_pool_module_name(node) if kind == "pool" else None) or node.name, kind
    elif node.op == "call_method" and node.target in METHOD_KINDS:
        return node.name, METHOD_KINDS[node.target]
    return None


def _pool_module_name(node: fx.Node) -> str | None:
    """The qualified name of the pooling module a captured (``torch.export``) pool call came from, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = getattr(kind, "__name__", str(kind)).rpartition(".")[2]
    return path if path and kind in {cls.__name__ for cls in POOL_MODULES} else None


def find_sites(gm: fx.GraphModule, recipe: Recipe) -> GraphPlan:
    """Walk the graph once and resolve the recipe for every quantizable op."""
    plan = GraphPlan()
    for node in gm.graph.nodes:
        found = _classify(gm, node, recipe.target)
        if found is None:
            if node.op == "call_function" and node.target in FLOAT_FUNCTIONS:
                plan.float_layers.append((node.name, f"{FLOAT_FUNCTIONS[node.target]}: no int8 kernel, runs in float"))
            continue
        name, kind = found
        weight, inp = recipe.resolve(name, kind)
        if kind in ("add", "cat", "matmul", "pool", *ELEMENTWISE_KINDS):
            weight = None
            inputs = _tensor_args(node, kind)
            if kind in ("add", "mul") and len(inputs) < 2:
                if kind == "mul":
                    plan.float_layers.append((name, "mul by a constant: runs in float"))
                continue  # x + constant: nothing to quantize jointly
        else:
            inputs = _tensor_args(node, kind)
        if weight is None and inp is None:
            plan.float_layers.append((name, "kept in float by a recipe rule"))
            continue
        if not all(_is_float_tensor(a) for a in inputs):
            continue  # index arithmetic on integer tensors (shapes, positions): nothing to quantize
        plan.sites.append(Site(name, kind, node, inputs, weight, inp))
    if recipe.target == "onnxruntime":
        _drop_dead_end_sites(gm, plan)
    return plan


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val is None or not isinstance(val, torch.Tensor) or val.is_floating_point()


HEAVY_KINDS = ("Conv1d", "Conv2d", "ConvTranspose2d", "Linear", "matmul", "pool")
DATA_OPS = ("transpose", "permute", "view", "reshape", "flatten", "contiguous", "clone", "dropout", "pad", "unsqueeze",
            "squeeze", "expand", "max_pool1d", "max_pool2d")


def _next_ops(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The ops that read ``node``, looking through ReLU-like and data-movement ops."""
    found, todo = [], list(node.users)
    while todo:
        user = todo.pop()
        name = str(getattr(user.target, "__name__", user.target)).lower()
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            moves = isinstance(mod, PASS_MODULES) or producer_bounds(gm, user) is not None
        else:
            moves = user.op in ("call_function", "call_method") and (
                producer_bounds(gm, user) is not None or any(name.endswith(d) for d in DATA_OPS))
        (todo.extend(user.users) if moves else found.append(user))
    return found


def _drop_dead_end_sites(gm: fx.GraphModule, plan: GraphPlan) -> None:
    """Element-wise sites (add, mul, sigmoid, concat, …) stay integer only when their result reaches an integer
    Conv / MatMul / Gemm / pool (directly or through other such sites). An Add whose sum only feeds LayerNorm —
    a transformer's residual stream — would add a rounding step and save no float op: it stays float."""
    useful: set[fx.Node] = set()
    for site in reversed(plan.sites):
        if site.kind in HEAVY_KINDS or any(n in useful for n in _next_ops(gm, site.node)):
            useful.add(site.node)
    for site in [s for s in plan.sites if s.node not in useful]:
        plan.sites.remove(site)
        plan.float_layers.append((site.name, f"{site.kind}: its result only feeds float ops, so an integer "
                                             f"kernel would add a rounding step and save nothing; runs in float"))


def producer_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """Known output range of ``node``: ``(0, None)`` after ReLU, ``(0, 6)`` after ReLU6, Hardtanh bounds."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.ReLU6):
            return (0.0, 6.0)
        if isinstance(mod, nn.Hardtanh):
            return (float(mod.min_val), float(mod.max_val))
        if isinstance(mod, nn.ReLU):
            return (0.0, None)
    elif node.op == "call_function":
        if node.target is F.relu6:
            return (0.0, 6.0)
        if node.target is F.hardtanh:
            lo, hi = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args[1:3]):])
            lo, hi = node.kwargs.get("min_val", lo), node.kwargs.get("max_val", hi)
            return (float(lo), float(hi))
        if node.target in (F.relu, torch.relu):
            return (0.0, None)
    elif node.op == "call_method" and node.target == "relu":
        return (0.0, None)
    return None


def _is_pass_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that commute with an affine quantizer: data movement, max pooling, and zero padding (real 0 is the
    code ``z`` in every affine spec, so the padded positions hold the same code either way; an engine pads a
    fused conv with the zero-point)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, PASS_MODULES) and not getattr(mod, "return_indices", False)
    if node.op == "call_function":
        if node.target is F.pad:
            return is_zero_pad(node)
        return node.target in PASS_FUNCTIONS and not node.kwargs.get("return_indices", False)
    return node.op == "call_method" and node.target in PASS_METHODS


def is_zero_pad(node: fx.Node) -> bool:
    """``F.pad(x, pads)`` / ``F.pad(x, pads, "constant", 0)``: zero padding."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return mode == "constant" and value in (None, 0, 0.0)


def quantization_point(gm: fx.GraphModule, arg: fx.Node, consumer: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Where a quantizer for ``arg`` (as consumed by ``consumer``) goes: ``(source tensor, node to rewire)``.

    Walks up through pass-through ops; the quantizer is placed on the source tensor and the first op of
    the chain (or the consumer itself) reads the quantized tensor. Zero padding is crossed too: a quantizer
    of its own after the pad would round the producer's codes a second time, which ONNX Runtime does not do
    (EfficientNet-B0's pads after SiLU: 29.7% parity with two quantizers, 100% with one).
    """
    user = consumer
    while True:
        if not _is_pass_through(gm, arg):
            return arg, user
        user, arg = arg, arg.args[0]


def _activation_spec(spec: QuantSpec, bounds: tuple | None, recipe: Recipe) -> QuantSpec:
    if bounds is not None and bounds[0] is not None and bounds[0] >= 0 and recipe.target == "onnxruntime":
        return unsigned_variant(spec)
    return spec


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _act_quantizer(gm: fx.GraphModule, node: fx.Node) -> TensorQuantizer | None:
    if node.op == "call_module" and str(node.target).startswith("lowbit_act."):
        mod = gm.get_submodule(node.target)
        if isinstance(mod, Requantize):
            return mod.source  # the same codes, re-applied after a reshape
        return mod if isinstance(mod, TensorQuantizer) else None
    return None


def _fused_producer(gm: fx.GraphModule, src: fx.Node) -> fx.Node:
    """The node the engine fuses with a quantizer on ``src``: through a ReLU/ReLU6 it removes, when the
    quantizer's codes start at real 0 (unsigned, zero-point 0)."""
    bounds = producer_bounds(gm, src)
    if bounds is not None and bounds[0] == 0 and src.args and isinstance(src.args[0], fx.Node):
        inner = src.args[0]
        if len(inner.users) == 1:
            return inner
    return src


def link_engine_kernels(gm: fx.GraphModule, target: str = "onnxruntime") -> int:
    """Tell layers and adds which quantizer the engine fuses onto their output, so the simulation can
    emulate the engine's integer kernels exactly (see ``lowbit.nn.kernels``). Returns the links made.

    ``target="litert"`` links Conv / Linear only (LiteRT: XNNPACK requantizes them like ONNX Runtime's QLinearConv,
    but its int8 ADD is not ONNX Runtime's AVX2 QLinearAdd, so adds keep the float simulation)."""
    links = integer_hardsigmoids(gm) if target == "onnxruntime" else 0
    for qnode in list(gm.graph.nodes):
        q_out = _act_quantizer(gm, qnode)
        if q_out is None or q_out.spec is None:
            continue
        src = qnode.args[0]
        # a ReLU / ReLU6 folds into the kernel when code qmin is real 0 or less: unsigned zero-point 0 (ONNX
        # Runtime), or any range clipped at 0 by the producer's bounds (LiteRT's fused activation clamps there)
        folds = q_out.spec.signed if target == "litert" else not q_out.spec.signed and q_out.spec.symmetric
        prod = _fused_producer(gm, src) if producer_bounds(gm, src) is not None and folds else src
        if len(src.users) != 1 or len(prod.users) != 1:
            continue
        if prod.op == "call_module" and isinstance(gm.get_submodule(prod.target), QuantLayerMixin):
            layer = gm.get_submodule(prod.target)
            if type(layer).__name__ in ("QuantConv1d", "QuantConv2d", "QuantLinear"):
                layer.set_engine_output(q_out)
                links += 1
        elif target != "litert" and prod is src and _link_add(gm, prod, q_out):
            links += 1
    gm.recompile()
    return links


def _link_add(gm: fx.GraphModule, node: fx.Node, q_out: TensorQuantizer) -> bool:
    if not (node.op == "call_function" and FUNCTION_KINDS.get(node.target) == "add" and len(node.args) == 2):
        return False
    ins = [a if isinstance(a, fx.Node) else None for a in node.args]
    quants = [_act_quantizer(gm, a) if a is not None else None for a in ins]
    if any(q is None for q in quants) or node.kwargs:
        return False
    mod = QuantAdd(node.name)
    mod.set_engine_quantizers(quants[0], quants[1], q_out)
    key = _key(f"add_{node.name}")
    gm.get_submodule("lowbit_act").add_module(key, mod)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(f"lowbit_act.{key}", tuple(ins))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return True


def _is_hardsigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target is F.hardsigmoid
    return node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Hardsigmoid


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (torch.mul, operator.mul)) or \
        (node.op == "call_method" and node.target == "mul")


def integer_hardsigmoids(gm: fx.GraphModule) -> int:
    """Replace each ``q_r(hardsigmoid(q_x(x)))`` read only by multiplications (Hardswish ``x · hardsigmoid(x)``,
    squeeze-excite gates) with ``nn.QuantHardSigmoid``: QLinearAdd(x, 3) into ``q_r``, read back at ``s_r / 6``
    (QLinearMul takes any input scale). Returns the number replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_hardsigmoid(gm, node) or not node.args or len(node.users) != 1:
            continue
        q_x, q_node = _act_quantizer(gm, node.args[0]), next(iter(node.users))
        q_r = _act_quantizer(gm, q_node)
        if q_x is None or q_r is None or isinstance(gm.get_submodule(q_node.target), Requantize):
            continue
        if not all(_is_mul(u) for u in q_node.users):
            continue  # a Conv / Gemm reading the codes would read them at s_r, not s_r / 6: keep the float op
        mod = QuantHardSigmoid(node.name)
        mod.set_engine_quantizers(q_x, q_r)
        key = _key(f"hardsigmoid_{node.name}")
        gm.get_submodule("lowbit_act").add_module(key, mod)
        with gm.graph.inserting_after(q_node):
            new = gm.graph.call_module(f"lowbit_act.{key}", (node.args[0],))
        q_node.replace_all_uses_with(new)
        gm.graph.erase_node(q_node)
        gm.graph.erase_node(node)
        count += 1
    return count
