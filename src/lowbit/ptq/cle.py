"""Cross-layer equalization (Nagel et al., 2019): make consecutive layers share their weight ranges.

For a pair ``layer1 → act → layer2`` with a positively homogeneous ``act`` (identity, ReLU), scaling output
channel ``i`` of layer1 by ``1/s_i`` and input channel ``i`` of layer2 by ``s_i`` leaves the network
unchanged. With ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``,

    s_i = sqrt(r1_i / r2_i)      gives both layers the range sqrt(r1_i · r2_i) on channel i,

which is what per-tensor weight quantization needs (a depthwise conv whose channels differ by 100x loses
them all to one scale). Pairs are equalized repeatedly until the scales settle (chains of layers).

ReLU6 is not homogeneous: ``relu6(y/s)·s = min(relu(y), 6s)``, so scaling moves the clip. lowbit keeps the
network exact instead of swapping ReLU6 for ReLU: a channel whose pre-activation maximum ``m_i`` (measured
on the calibration data) reaches 6 is not scaled (``s_i = 1``), and any other channel is scaled only so far
that it stays below the clip (``s_i ≥ m_i / 6``). Without data, ReLU6 pairs are left alone.

Runs on a prepared model before calibration (BatchNorm is already folded); Conv/Linear pairs only, with
zero padding, quantizers, dropout or identity allowed between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from lowbit.nn import QuantLayerMixin, TensorQuantizer
from lowbit.ptq.capture import as_forward_loop

log = logging.getLogger(__name__)

HOMOGENEOUS = (nn.ReLU,)
CLIPPED = (nn.ReLU6,)
TRANSPARENT = (TensorQuantizer, nn.ZeroPad2d, nn.Dropout, nn.Identity)
MAX_SCALE = 2.0**10


@dataclass
class Pair:
    """Two layers with a channel-wise scale-equivariant path between them."""

    first: str
    second: str
    clip: float | None = None  # the ReLU6 bound on the way, if any


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def find_pairs(gm: nn.Module) -> list[Pair]:
    """Every ``layer1 → (ReLU | ReLU6 | pad | quantizer)* → layer2`` path with single-use tensors."""
    if not isinstance(gm, fx.GraphModule):
        return []
    pairs = []
    for node in gm.graph.nodes:
        first = _module(gm, node)
        if not isinstance(first, QuantLayerMixin) or isinstance(first, nn.ConvTranspose2d):
            continue
        clip, cur, ok = None, node, True
        while ok and len(cur.users) == 1:
            cur = next(iter(cur.users))
            mod = _module(gm, cur)
            if isinstance(mod, QuantLayerMixin):
                if not isinstance(mod, nn.ConvTranspose2d) and _groups_ok(first, mod):
                    pairs.append(Pair(str(node.target), str(cur.target), clip))
                break
            if isinstance(mod, CLIPPED) and clip is None:
                clip = 6.0
            elif not isinstance(mod, HOMOGENEOUS + TRANSPARENT):
                ok = False
    return pairs


def _groups_ok(first: nn.Module, second: nn.Module) -> bool:
    channels = first.weight.shape[0]
    in2 = second.weight.shape[1] * getattr(second, "groups", 1)
    return channels == in2


def _input_channel_view(layer: nn.Module) -> torch.Tensor:
    """Layer weights as ``[in_channels, rest]`` (grouped convs: each input channel's own slice)."""
    w = layer.weight
    g = getattr(layer, "groups", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    per = w.reshape(g, cout // g, cin_g, -1)  # [g, out_g, in_g, k]
    return per.permute(0, 2, 1, 3).reshape(g * cin_g, -1)


def _scale_input_channels(layer: nn.Module, s: torch.Tensor) -> None:
    g = getattr(layer, "groups", 1)
    w = layer.weight
    cout, cin_g = w.shape[0], w.shape[1]
    view = w.data.reshape(g, cout // g, cin_g, -1)
    view.mul_(s.reshape(g, 1, cin_g, 1).to(w.dtype))


def pair_scales(first: nn.Module, second: nn.Module, clip: float | None, pre_max: torch.Tensor | None) -> torch.Tensor:
    """``s_i`` for one pair (see module doc), 1 where a range is zero or the clip forbids scaling."""
    r1 = first.weight.detach().reshape(first.weight.shape[0], -1).abs().amax(dim=1).double()
    r2 = _input_channel_view(second).detach().abs().amax(dim=1).double()
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
    s = s.clamp(1 / MAX_SCALE, MAX_SCALE)
    if clip is not None:
        if pre_max is None:
            return torch.ones_like(s)
        m = pre_max.double()
        s = torch.where(m >= clip, torch.ones_like(s), torch.maximum(s, m / clip))
    return s


def _apply_scales(first: nn.Module, second: nn.Module, s: torch.Tensor) -> None:
    with torch.no_grad():
        shape = (-1,) + (1,) * (first.weight.ndim - 1)
        first.weight.div_(s.reshape(shape).to(first.weight.dtype))
        if first.bias is not None:
            first.bias.div_(s.to(first.bias.dtype))
        _scale_input_channels(second, s)


def pre_activation_max(model: nn.Module, loop, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-channel maximum of each layer's output over the data (one pass, hooks on all layers)."""
    best: dict[str, torch.Tensor] = {}

    def hook(layer, name):
        dim = -1 if isinstance(layer, nn.Linear) else 1

        def on_output(_m, _a, y):
            m = y.detach().movedim(dim, 0).reshape(y.shape[dim], -1).amax(dim=1)
            best[name] = m if name not in best else torch.maximum(best[name], m)
        return on_output

    handles = [layer.register_forward_hook(hook(layer, name)) for name, layer in layers.items()]
    try:
        loop(model)
    finally:
        for h in handles:
            h.remove()
    return best


def apply(model: nn.Module, forward_loop=None, iterations: int = 20, tol: float = 1e-3) -> nn.Module:
    """Equalize every Conv/Linear pair of a prepared (not yet calibrated) model in place.

    Args:
        forward_loop: calibration data, used only to find where ReLU6 clips; None is fully data-free
            (ReLU6 pairs are then skipped).
        iterations: sweeps over all pairs at most.
        tol: stop when every ``|log s_i|`` of a sweep is below this.
    """
    pairs = find_pairs(model)
    if not pairs:
        log.warning("cle: no Conv/Linear pairs found (needs a traced model with layer → activation → layer paths)")
        return model
    loop = as_forward_loop(forward_loop) if forward_loop is not None else None
    clipped = [p for p in pairs if p.clip is not None]
    if clipped and loop is None:
        log.info("cle: %d ReLU6 pairs left alone (no data to tell where ReLU6 clips)", len(clipped))
    mods = dict(model.named_modules())
    pre_max = {}
    if clipped and loop is not None:
        pre_max = pre_activation_max(model, loop, {p.first: mods[p.first] for p in clipped})
    for sweep in range(iterations):
        worst = 0.0
        for p in pairs:
            first, second = mods[p.first], mods[p.second]
            s = pair_scales(first, second, p.clip, pre_max.get(p.first))
            _apply_scales(first, second, s)
            if p.first in pre_max:
                pre_max[p.first] = pre_max[p.first] / s.to(pre_max[p.first].dtype)
            worst = max(worst, float(torch.log(s).abs().max()))
        if worst < tol:
            break
    log.info("cle: %d pairs (%d through ReLU6) equalized in %d sweeps", len(pairs), len(clipped), sweep + 1)
    return model


__all__ = ["Pair", "apply", "find_pairs", "pair_scales"]
