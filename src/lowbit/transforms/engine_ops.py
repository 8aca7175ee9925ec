"""What each deployment engine runs on integer tensors, and the graph rewrites that let it.

ONNX Runtime (CPU) fuses ``DQ → op → Q`` into an integer kernel for Conv, MatMul, Gemm (``QGemm`` also
without the output Q), Add, Mul, Concat, Sigmoid, LeakyRelu, the pools, Softmax, and runs Transpose /
Reshape / Flatten / MaxPool on the codes when the Q/DQ around them share qparams. It has no integer kernel
for HardSigmoid, HardSwish, Tanh, GELU, LayerNormalization or Erf (measured with ONNX Runtime 1.32: a
``DQ → op → Q`` triple of these stays float). A heavy op therefore needs a quantizer on its *output* too,
whatever consumes it, or the engine cannot form its integer kernel; SiLU is rewritten as ``x · sigmoid(x)``
so that both halves run as QLinearSigmoid and QLinearMul, Hardswish as ``x · hardsigmoid(x)`` (QLinearMul).

TensorRT fuses Q/DQ itself around any op (explicit quantization), so its placement stays at the inputs of
Conv / MatMul / Gemm and residual adds.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# Element-wise ops with integer kernels on ONNX Runtime (QLinearSigmoid, QLinearLeakyRelu, QLinearMul): call → kind.
# hardsigmoid has no integer kernel of its own: it runs as QLinearAdd(x, 3) into a saturating Q (nn.QuantHardSigmoid)
ORT_ELEMENTWISE_FUNCTIONS = {
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.leaky_relu: "leaky_relu", F.hardsigmoid: "hardsigmoid",
    torch.mul: "mul", operator.mul: "mul",
}
ORT_ELEMENTWISE_METHODS = {"sigmoid": "sigmoid", "mul": "mul"}
ORT_ELEMENTWISE_MODULES = ((nn.Sigmoid, "sigmoid"), (nn.LeakyReLU, "leaky_relu"), (nn.Hardsigmoid, "hardsigmoid"))
ELEMENTWISE_KINDS = ("sigmoid", "leaky_relu", "hardsigmoid", "mul")
# Kinds whose ONNX form fuses into an integer kernel with a float output, so they need no output Q (which would
# only add rounding error): Linear (``QGemm`` / ``MatMulIntegerToFloat``) and matmul (``MatMulIntegerToFloat``).
FLOAT_OUTPUT_OK = ("Linear",)


def elementwise_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The ONNX Runtime integer element-wise kind of ``node`` (``sigmoid``, ``leaky_relu``, ``mul``), or None."""
    if node.op == "call_function":
        return ORT_ELEMENTWISE_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ORT_ELEMENTWISE_METHODS.get(node.target)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return next((kind for cls, kind in ORT_ELEMENTWISE_MODULES if type(mod) is cls), None)
    return None


# x · gate(x) activations: the gate function, its call forms (function, method name, module class)
GATED = {
    "silu": (torch.sigmoid, (F.silu,), "silu", nn.SiLU),
    "hardswish": (F.hardsigmoid, (F.hardswish,), "hardswish", nn.Hardswish),
}


def _gated_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    for kind, (_, functions, method, module) in GATED.items():
        if node.op == "call_function" and node.target in functions:
            return kind
        if node.op == "call_method" and node.target == method:
            return kind
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is module:
            return kind
    return None


def decompose_gated(gm: fx.GraphModule) -> int:
    """Rewrite every SiLU as ``x · sigmoid(x)`` and every Hardswish as ``x · hardsigmoid(x)`` (the same functions,
    up to last-ulp rounding), so that an integer engine runs the product as QLinearMul and the sigmoid as
    QLinearSigmoid (ONNX Runtime has no integer HardSigmoid: it runs in float between a DQ and a Q, as in
    ONNX Runtime's own quantized files). Returns the number rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        kind = _gated_kind(gm, node)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        with gm.graph.inserting_after(node):
            gate = gm.graph.call_function(GATED[kind][0], (x,))
        with gm.graph.inserting_after(gate):
            mul = gm.graph.call_function(torch.mul, (x, gate))
        mul.meta = dict(node.meta)
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def output_point(node: fx.Node, fused) -> fx.Node:
    """The tensor an engine's fused kernel for ``node`` writes: through the ops ``fused(user)`` accepts that
    follow it alone (ReLU / ReLU6 / Clip, which ONNX Runtime folds into the output quantization, and a batch
    norm that QAT folds later), else ``node`` itself."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "output" or not fused(user) or not user.args or user.args[0] is not node:
            break
        node = user
    return node


def _causal_fill(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with every key after its query masked out (``-inf``), as ``is_causal=True`` does."""
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~keep, float("-inf"))


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores + mask`` for an additive attention mask (kept out of quantization: its values reach -3e38)."""
    return scores + mask


def _sdpa_args(node: fx.Node) -> dict | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if set(args) - set(names) or args.get("dropout_p", 0.0) not in (0, 0.0) or args.get("enable_gqa", False):
        return None
    q = args.get("query")
    val = q.meta.get("val") if isinstance(q, fx.Node) else None
    if args.get("scale") is None:
        if val is None:
            return None
        args["scale"] = 1.0 / float(val.shape[-1]) ** 0.5
    return args


def decompose_attention(gm: fx.GraphModule) -> int:
    """Rewrite ``scaled_dot_product_attention`` as ``softmax(q kᵀ · scale + mask) v`` (the same function) so
    that both matrix products become quantizable MatMul sites (QLinearMatMul); the softmax stays float.
    Calls with dropout or grouped-query heads are left alone. Returns the number rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        args = _sdpa_args(node)
        if args is None:
            continue
        g = gm.graph
        with g.inserting_before(node):
            kt = g.call_function(torch.transpose, (args["key"], -2, -1))
            scores = g.call_function(torch.matmul, (args["query"], kt))
            scores = g.call_function(operator.mul, (scores, args["scale"]))
            mask = args.get("attn_mask")
            if isinstance(mask, fx.Node):
                is_bool = getattr(mask.meta.get("val"), "dtype", None) == torch.bool
                if is_bool:
                    scores = g.call_function(torch.masked_fill, (scores, g.call_function(torch.logical_not, (mask,)),
                                                                 float("-inf")))
                else:  # an additive mask (0 / large negative): float, never an integer Add site
                    scores = g.call_function(_add_mask, (scores, mask))
            if args.get("is_causal"):
                scores = g.call_function(_causal_fill, (scores,))
            probs = g.call_function(torch.softmax, (scores, -1))
            out = g.call_function(torch.matmul, (probs, args["value"]))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def explicit_same_padding(gm: fx.GraphModule) -> int:
    """Give convolutions with ``padding="same"`` their numeric (symmetric) padding, which the ONNX exporter
    writes into the Conv itself instead of a separate Pad between the DQ and the Conv (that Pad would keep
    ONNX Runtime from fusing QLinearConv). Asymmetric cases (even kernels) are left alone."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.padding != "same":
            continue
        total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
        if any(t % 2 for t in total):
            continue
        mod.padding = tuple(t // 2 for t in total)
        changed += 1
    return changed


def global_pools_for_whole_map_windows(gm: fx.GraphModule) -> int:
    """An ``nn.AvgPool2d`` whose window covers its whole (captured) input map with one output — e.g. a
    ``kernel 1280, ceil_mode=True`` pooler on a 7x7 map — computes the mean of the map: it becomes
    ``nn.AdaptiveAvgPool2d(1)`` (GlobalAveragePool). ONNX Runtime 1.32 fuses the original ``DQ → AveragePool →
    Q`` into a QLinearAveragePool that returns zeros when the kernel exceeds the map. Returns the count."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.AvgPool2d:
            continue
        mod = gm.get_submodule(node.target)
        val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
        if val is None or val.dim() != 4 or mod.padding not in (0, (0, 0)) or mod.divisor_override is not None:
            continue
        kernel = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * 2
        spatial = [int(d) for d in val.shape[2:]]
        fits = all(k >= d for k, d in zip(kernel, spatial)) and (mod.ceil_mode or list(kernel) == spatial)
        if fits and any(k > d for k, d in zip(kernel, spatial)):
            gm.add_submodule(str(node.target), nn.AdaptiveAvgPool2d(1))
            changed += 1
    return changed
