"""SmoothQuant: migrate activation outliers into the weights, per input channel (Xiao et al., 2023).

For the Linear layers that read one tensor ``X`` (e.g. query, key and value), with ``a_j = max |X_:,j|`` over
the calibration data and ``w_j = max |W_:,j|`` over all of their weight rows::

    s_j = clamp(a_j^α / w_j^(1-α), 1e-5, 1e5)          (s_j = 1 where a_j or w_j is 0)
    X W ᵀ = (X · diag(1/s)) (W · diag(s))ᵀ             (exact in float)

so the activation range per channel shrinks (fewer outliers for a per-tensor INT8 scale) and the weights,
quantized per output channel, absorb the factor. ``α`` sets how much difficulty moves to the weights.

The pass works on the float model's ``torch.fx`` graph, before ``prepare_``: it scales the weights and puts
one ``x * (1/s)`` node on each smoothed tensor (a float elementwise multiply; folding it into a producer is
not always exact — BERT's LayerNorm outputs also feed the residual path). The result is a float
``GraphModule`` that computes the same function; quantize it as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from lowbit.data import Data, iter_batches, run_batch
from lowbit.transforms.recipe import pattern_matches

log = logging.getLogger(__name__)

S_MIN, S_MAX = 1e-5, 1e5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """``alpha`` in [0, 1]; ``skip``: layer-name globs / ``re:`` patterns whose input is left alone."""

    alpha: float = 0.5
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.skip, tuple):
            object.__setattr__(self, "skip", tuple(self.skip))


def smoothing_factors(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = clamp(a_j^α / w_j^(1-α), 1e-5, 1e5)``, 1 where either maximum is 0 (see module docstring)."""
    a, w = act_amax.double(), weight_amax.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return torch.clamp(s, S_MIN, S_MAX).to(torch.float32)


def linear_groups(gm: fx.GraphModule, skip: tuple[str, ...] = ()) -> dict[fx.Node, list[str]]:
    """Tensor node → names of the ``nn.Linear`` modules that read it (first positional argument)."""
    groups: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Linear:
            continue
        name = str(node.target)
        if any(pattern_matches(p, name, "Linear") for p in skip) or not isinstance(node.args[0], fx.Node):
            continue
        groups.setdefault(node.args[0], []).append(name)
    return groups


def input_channel_amax(model: nn.Module, names: list[str], data: Data, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``max |x_:,j|`` of the input of each named Linear over ``data`` (streamed, no activation is kept)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(_mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            n = 0
            for batch in iter_batches(data, batch_size):
                run_batch(model, batch)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("SmoothQuant: calibration data is empty: no batch was seen")
    return amax


def smooth_(model: nn.Module, data: Data, config: SmoothQuantConfig | None = None) -> fx.GraphModule:
    """Apply SmoothQuant to every group of Linear layers sharing an input; returns the smoothed GraphModule.

    Args:
        model: eval-mode float model that ``torch.fx`` can trace.
        data: calibration batches (as for ``calibrate``).
        config: ``alpha`` and layers to skip.

    Raises:
        ValueError: when the model cannot be traced (named), or the data is empty.
    """
    config = config or SmoothQuantConfig()
    try:
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 — any tracing failure is reported in one line
        raise ValueError(f"SmoothQuant needs a torch.fx-traceable model: {type(exc).__name__}: {exc}") from None
    groups = linear_groups(gm, config.skip)
    amax = input_channel_amax(gm, [n for names in groups.values() for n in names], data)
    for i, (src, names) in enumerate(groups.items()):
        mods = [gm.get_submodule(n) for n in names]
        a = torch.stack([amax[n] for n in names]).amax(dim=0)
        w = torch.cat([m.weight.detach().abs() for m in mods]).amax(dim=0)
        s = smoothing_factors(a, w, config.alpha)
        with torch.no_grad():
            for m in mods:
                m.weight.mul_(s)
        key = f"smoothquant_inv_scale_{i}"
        gm.register_buffer(key, 1.0 / s)
        first = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in names)
        with gm.graph.inserting_before(first):
            scale = gm.graph.get_attr(key)
            smoothed = gm.graph.call_function(torch.mul, (src, scale))
        for node in list(src.users):
            if node.op == "call_module" and str(node.target) in names:
                node.replace_input_with(src, smoothed)
        log.info("smoothquant: %s (alpha %.2f): activation max %.3g -> %.3g", ", ".join(names), config.alpha,
                 float(a.max()), float((a / s).max()))
    gm.graph.lint()
    gm.recompile()
    gm.smoothquant = {"alpha": config.alpha, "groups": [names for names in groups.values()]}
    return gm


def apply(model: nn.Module, forward_loop: Data, alpha: float = 0.5) -> fx.GraphModule:
    """The pass form (``apply(model, data)``) of :func:`smooth_` on a float model."""
    return smooth_(model, forward_loop, SmoothQuantConfig(alpha=alpha))


__all__ = ["SmoothQuantConfig", "apply", "input_channel_amax", "linear_groups", "smooth_", "smoothing_factors"]
