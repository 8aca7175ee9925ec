"""Fold BatchNorm into the preceding Conv / Linear.

For an eval-mode BatchNorm ``y = γ (x - μ) / sqrt(σ² + ε) + β`` after ``x = W * u + b``:

    k  = γ / sqrt(σ² + ε)                 (one factor per output channel)
    W' = W · k                            (along the weight's output-channel axis)
    b' = (b - μ) · k + β

so that ``W' * u + b' == BN(W * u + b)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.transforms.lift import _attr

log = logging.getLogger(__name__)

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_bn_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    out_axis: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure fold of BatchNorm statistics into weight and bias (see module docstring).

    Args:
        weight: conv / linear weight.
        bias: its bias, or None (treated as 0).
        mean, var, eps, gamma, beta: the BatchNorm's running statistics and affine parameters
            (``gamma``/``beta`` None when the BN has no affine part).
        out_axis: the weight's output-channel axis (1 for ConvTranspose).

    Returns:
        ``(W', b')``.
    """
    k = torch.rsqrt(var + eps)
    if gamma is not None:
        k = gamma * k
    shape = [1] * weight.ndim
    shape[out_axis] = -1
    new_weight = weight * k.reshape(shape)
    b = torch.zeros_like(mean) if bias is None else bias
    new_bias = (b - mean) * k
    if beta is not None:
        new_bias = new_bias + beta
    return new_weight, new_bias


def _out_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0


def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer`` in place (``layer`` gains a bias if it had none)."""
    _fold_params(layer, BNParams("bn", bn.running_mean, bn.running_var, bn.eps, bn.weight if bn.affine else None,
                                 bn.bias if bn.affine else None, bn.training))


def _fold_params(layer: nn.Module, bn: BNParams) -> None:
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups != 1:
        raise ValueError("cannot fold BatchNorm into a grouped ConvTranspose")
    with torch.no_grad():
        w, b = fold_bn_weights(layer.weight, layer.bias, bn.mean, bn.var, bn.eps, bn.gamma, bn.beta, _out_axis(layer))
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.copy_(b)


@dataclass(frozen=True)
class BNParams:
    """An eval-mode batch norm's statistics and affine parameters, wherever they came from."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    training: bool


# Positions of (input, weight, bias, running_mean, running_var, training, eps) in each functional form.
_FUNCTIONAL_BN = {
    torch.batch_norm: (0, 1, 2, 3, 4, 5, 7),  # aten order: input, weight, bias, mean, var, training, momentum, eps
    F.batch_norm: (0, 3, 4, 1, 2, 5, 7),  # input, running_mean, running_var, weight, bias, training, momentum, eps
}
_F_BN_KWARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _value(gm: fx.GraphModule, arg):
    """A constant argument: a get_attr node's tensor, or the literal itself."""
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            raise ValueError("not a constant")
        return _attr(gm, str(arg.target)).detach()
    return arg


def _bn_params(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, BNParams] | None:
    """``(input node, parameters)`` of a batch-norm node (module or functional form), or None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), BATCHNORMS):
        bn = gm.get_submodule(node.target)
        if not bn.track_running_stats or bn.running_mean is None:
            return None
        params = BNParams(str(node.target), bn.running_mean, bn.running_var, bn.eps,
                          bn.weight if bn.affine else None, bn.bias if bn.affine else None, bn.training)
        return (node.args[0] if node.args else None), params
    if node.op != "call_function" or node.target not in _FUNCTIONAL_BN:
        return None
    args = list(node.args)
    if node.target is F.batch_norm:
        args += [node.kwargs.get(k) for k in _F_BN_KWARGS[len(args):]]
    elif node.kwargs:
        return None
    x, w, b, mean, var, training, eps = (args[i] if i < len(args) else None for i in _FUNCTIONAL_BN[node.target])
    name = node.name
    if isinstance(mean, fx.Node) and str(mean.target).endswith(".running_mean"):
        name = str(mean.target)[: -len(".running_mean")]  # the batch norm module it came from
    try:
        mean, var, w, b = (_value(gm, v) for v in (mean, var, w, b))
    except ValueError:
        return None
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    eps = 1e-5 if eps is None else float(eps)
    return x, BNParams(name, mean, var, eps, w, b, bool(training))


def _foldable_pair(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, nn.Module, BNParams] | None:
    found = _bn_params(gm, node)
    if found is None:
        return None
    prev, params = found
    if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
        return None
    layer = gm.get_submodule(prev.target)
    if not isinstance(layer, FOLDABLE):
        return None
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups != 1:
        return None
    return prev, layer, params


def fold_bn_graph(gm: fx.GraphModule) -> list[str]:
    """Fold every batch norm that directly follows a Conv/Linear in a captured graph, by pattern: the
    ``nn.BatchNorm*`` module and the functional ``batch_norm`` (library "norm + activation" modules, ATen
    graphs) alike, wherever the modules nest. Returns the folded batch norms' names."""
    folded = []
    for node in list(gm.graph.nodes):
        pair = _foldable_pair(gm, node)
        if pair is None:
            continue
        prev, layer, bn = pair
        if bn.training:
            raise ValueError(f"BatchNorm {bn.name} is in training mode; call model.eval() before prepare_")
        _fold_params(layer, bn)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded.append(bn.name)
    gm.graph.lint()
    gm.graph.eliminate_dead_code()
    _delete_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.info("folded %d BatchNorm layers", len(folded))
    return folded


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop parameters and buffers that no node reads any more (a folded functional batch norm's statistics),
    so the prepared model holds what is exported and nothing else."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        if name in used or any(name.startswith(u + ".") for u in used):
            continue
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if isinstance(owner, nn.modules.batchnorm._BatchNorm):
            continue  # a module that is still called keeps its own state
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


def fold_bn_sequential(model: nn.Module) -> list[str]:
    """Module-level fallback: fold BN that follows a Conv/Linear inside ``nn.Sequential`` containers."""
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            layer, bn = parent._modules[a], parent._modules[b]
            if isinstance(layer, FOLDABLE) and isinstance(bn, BATCHNORMS):
                fold_into(layer, bn)
                parent._modules[b] = nn.Identity()
                folded.append(f"{parent_name}.{b}" if parent_name else b)
    return folded
