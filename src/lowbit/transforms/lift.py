"""Lifting captured ATen calls back into module calls, so names, recipe rules and quantized twins apply.

``torch.export`` inlines every module into ATen ops. A ``conv*`` / ``linear`` call on a layer's own parameters
is a call of that layer; a parameter-free leaf module (pool, activation, flatten, padding) that became one op is a
call of that module; ``addmm(b, x, W)`` on constants (GPT-2's ``Conv1D``) is an ``nn.Linear`` holding ``Wᵀ``.
Each rewrite computes the same function (the capture is checked against the model afterwards).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


def _size(x: torch.Tensor, dim: int) -> int:
    """``x.size(dim)``: what ``sym_size`` becomes, so the ONNX trace keeps the batch axis dynamic."""
    return x.size(dim)


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


LIFTABLE = {
    F.linear: (nn.Linear,),
    torch.conv1d: (nn.Conv1d,),
    torch.conv2d: (nn.Conv2d,),
    torch.conv_transpose2d: (nn.ConvTranspose2d,),
}


def _op_args(mod: nn.Module) -> tuple[list, list, int]:
    """``(module's own arguments, the op's defaults, index of groups)`` after ``(x, weight, bias)``."""
    if isinstance(mod, nn.ConvTranspose2d):
        return [mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation], [1, 0, 0, 1, 1], 3
    return [mod.stride, mod.padding, mod.dilation, mod.groups], [1, 0, 1, 1], 3


def _same_call(node: fx.Node, mod: nn.Module) -> bool:
    """True when the node's arguments are exactly what ``mod(x)`` passes to its op (defaults filled in)."""
    if getattr(mod, "padding_mode", "zeros") != "zeros" or node.kwargs:
        return False
    if isinstance(mod, nn.Linear):
        return len(node.args) <= 3
    want, defaults, groups_at = _op_args(mod)
    got = list(node.args[3:]) + defaults[max(len(node.args) - 3, 0):]
    n = mod.weight.ndim - 2

    def norm(v, i):
        if v == "valid":
            return (0,) * n
        if i == groups_at or isinstance(v, str):
            return v
        return (v,) * n if isinstance(v, int) else tuple(v)

    return [norm(v, i) for i, v in enumerate(got)] == [norm(v, i) for i, v in enumerate(want)]


def _owner(model: nn.Module, node: fx.Node) -> tuple[str, nn.Module] | None:
    """``(qualified name, module)`` of the original layer whose weight ``node`` (a get_attr) reads."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or not str(node.target).endswith(".weight"):
        return None
    path = str(node.target)[: -len(".weight")]
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        return None


def _lift_layers(gm: fx.GraphModule, model: nn.Module) -> int:
    """Turn ``conv*`` / ``linear`` calls on a layer's own parameters back into calls of that layer."""
    lifted = 0
    for node in list(gm.graph.nodes):
        kinds = LIFTABLE.get(node.target) if node.op == "call_function" else None
        if kinds is None or len(node.args) < 2:
            continue
        owner = _owner(model, node.args[1])
        base = kinds[0]
        if owner is None or not isinstance(owner[1], base) or type(owner[1]).forward is not base.forward:
            continue  # a subclass with its own forward is not this op alone
        path, mod = owner
        if type(mod) is not base:
            mod = _as_base(mod, base)
        bias = node.args[2] if len(node.args) > 2 else None
        bias_ok = (mod.bias is None and bias is None) or (
            isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias")
        if not bias_ok or not _same_call(node, mod):
            continue
        _replace_with_module_call(gm, node, path, mod, node.args[0])
        lifted += 1
    gm.graph.eliminate_dead_code()
    return lifted


LEAF_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.LeakyReLU,
    nn.Tanh, nn.Flatten, nn.Dropout, nn.ZeroPad2d, nn.Identity,
)


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _lift_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> int:
    """Calls of parameter-free leaf modules (pools, activations, flatten, padding) that ``torch.export`` inlined
    as one op each become calls of the module again, so that names and rules match the model's modules."""
    by_path: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        path = _innermost(node) if node.op in ("call_function", "call_method") else None
        if path:
            by_path.setdefault(path, []).append(node)
    lifted = 0
    for path, nodes in by_path.items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        real = [n for n in nodes if n.target is not _size]
        if type(mod) not in LEAF_MODULES or len(real) != 1 or not real[0].args:
            continue
        node = real[0]
        if not isinstance(node.args[0], fx.Node) or any(isinstance(a, fx.Node) for a in node.args[1:]):
            continue
        _replace_with_module_call(gm, node, path, mod, node.args[0])
        lifted += 1
    return lifted


def _replace_with_module_call(gm: fx.GraphModule, node: fx.Node, path: str, mod: nn.Module, x: fx.Node) -> None:
    """Install ``mod`` at ``path`` (unless it is there) and let ``mod(x)`` stand where ``node`` stood."""
    if not _has_module(gm, path, mod):
        gm.add_submodule(path, mod)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _as_base(mod: nn.Module, base: type) -> nn.Module:
    """A ``base`` instance sharing ``mod``'s parameters and settings (a subclass that only renames the class)."""
    new = base.__new__(base)
    new.__dict__ = mod.__dict__.copy()
    new._parameters, new._buffers, new._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
    return new


def _lift_addmm(gm: fx.GraphModule) -> int:
    """``addmm(b, x, W)`` on constant ``W [in, out]`` / ``b`` (GPT-2's ``Conv1D`` and the like) → a call of an
    ``nn.Linear`` holding ``Wᵀ`` (the same function), named after the module that owned ``W``."""
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.addmm or len(node.args) != 3 or node.kwargs:
            continue
        bias, x, weight = node.args
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (bias, weight)):
            continue
        w, b = _attr(gm, str(weight.target)), _attr(gm, str(bias.target))
        path = str(weight.target).rpartition(".")[0]
        if w.dim() != 2 or b.dim() != 1 or b.numel() != w.shape[1] or not path or _taken(gm, path):
            continue
        if len(weight.users) != 1 or len(bias.users) != 1:
            continue  # W shared with another op (tied weights): leave the call as it is
        layer = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            layer.weight = nn.Parameter(w.detach().t().contiguous())
            layer.bias = nn.Parameter(b.detach().clone())
        _replace_with_module_call(gm, node, path, layer, x)
        lifted += 1
    return lifted


def _taken(gm: fx.GraphModule, path: str) -> bool:
    """True when ``path`` is already a module the graph calls."""
    return any(n.op == "call_module" and str(n.target) == path for n in gm.graph.nodes)


def _has_module(gm: fx.GraphModule, path: str, mod: nn.Module) -> bool:
    try:
        return gm.get_submodule(path) is mod
    except AttributeError:
        return False


def lift_modules(gm: fx.GraphModule, model: nn.Module) -> int:
    """All three lifts (see the module docstring); returns how many calls became module calls."""
    return _lift_layers(gm, model) + _lift_leaf_modules(gm, model) + _lift_addmm(gm)
