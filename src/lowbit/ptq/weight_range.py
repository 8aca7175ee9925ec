"""Output-aware weight ranges: pick each output channel's clipping by the error it causes downstream.

Min-max weight scales waste most of a 2- or 4-bit grid on one large weight. For every output channel
(row ``r`` of ``W``) lowbit tries scales ``α · s_r`` for ``α`` in ``linspace(min_ratio, 1, n)`` and keeps
the one with the least output error under the captured input moment ``H``::

    err_r(α) = Δw_r H Δw_rᵀ,     Δw_r = w_r − Q_{α s_r}(w_r)

(α = 1, min-max, is a candidate, so the result is never worse than min-max for round-to-nearest). Per-tensor
weights get one α for the whole tensor (the summed error).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from lowbit.core import PerTensor
from lowbit.nn import QuantLayerMixin
from lowbit.ptq.capture import InputMoments, as_forward_loop, effective_input, weight_matrix
from lowbit.ptq.frontier import visit_layers

log = logging.getLogger(__name__)


def quantize_columns(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest on the grid: ``(clamp(round(w / s) + z, qmin, qmax) − z) · s``."""
    return (torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax) - zero_point) * scale


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``Σ_g tr(ΔW_g H_g ΔW_gᵀ)``: the layer output error ``‖(W − Ŵ) X‖²`` the input moment implies."""
    delta = (weight - quantized).double()
    return float(torch.einsum("grd,gde,gre->", delta, hessian.double(), delta))


def layer_grid(layer: QuantLayerMixin) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-element scale and zero-point of the layer's frozen weight quantizer as ``[G, r, d]``, and qmin/qmax."""
    wq = layer.weight_quantizer
    s, z = wq.expanded(layer.weight.shape)
    shape = layer.weight.shape
    s = weight_matrix(layer, s.expand(shape).float())
    z = weight_matrix(layer, z.expand(shape).float())
    return s, z, wq.spec.qmin, wq.spec.qmax


def quantizable(layer: QuantLayerMixin) -> bool:
    """True when the layer's weight quantizer is frozen and active (the passes leave other layers alone)."""
    return layer.weight_quantizer.is_active and not isinstance(layer, nn.ConvTranspose2d)


def row_errors(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Δw_r H Δw_rᵀ`` for every row, ``[G, r]``."""
    delta = (w - q).double()
    return torch.einsum("grd,gde,gre->gr", delta, h.double(), delta)


def search_clipping(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, h: torch.Tensor,
                    per_row: bool = True, num: int = 40, min_ratio: float = 0.3) -> torch.Tensor:
    """Best clipping ratio ``α`` per row (``[G, r]``; one shared value when ``per_row`` is False)."""
    best_err = None
    best = torch.ones(w.shape[:2], dtype=torch.float64, device=w.device)
    for ratio in torch.linspace(1.0, min_ratio, num).tolist():
        err = row_errors(w, quantize_columns(w, s * ratio, z, qmin, qmax), h)
        if not per_row:
            err = err.sum().expand_as(err)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, torch.full_like(best, ratio), best)
        best_err = torch.where(better, err, best_err)
    return best


def refine_weight_scales(layer: QuantLayerMixin, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                         h: torch.Tensor) -> torch.Tensor:
    """Search the clipping of ``layer``'s weight quantizer, store the new scales, return the per-element grid.

    Args:
        w, s, z: weights and per-element scale / zero-point as ``[G, r, d]``.
        h: input second moment ``[G, d, d]``.
    """
    wq = layer.weight_quantizer
    per_tensor = isinstance(wq.spec.granularity, PerTensor)
    alpha = search_clipping(w, s, z, qmin, qmax, h, per_row=not per_tensor)
    flat = alpha.reshape(-1).to(wq.scale.dtype)  # one α per output channel, in weight order
    if per_tensor:
        new = wq.scale * flat[0]
    elif wq.scale.ndim == 1 and wq.scale.numel() == flat.numel():
        new = wq.scale * flat
    elif wq.scale.ndim == 2 and wq.scale.shape[0] == flat.numel():
        new = wq.scale * flat[:, None]
    else:
        log.info("%s: weight scale layout %s not searched", layer.layer_name, tuple(wq.scale.shape))
        return s
    wq.set_qparams(new, wq.zero_point)
    log.debug("%s: weight clipping α mean %.3f min %.3f", layer.layer_name, float(flat.mean()), float(flat.min()))
    return s * alpha.to(s.dtype).unsqueeze(-1)


# rounder(w, h, s, z, qmin, qmax) -> on-grid weights, all [G, r, d] (h: [G, d, d])
Rounder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def round_layers(model: nn.Module, forward_loop, rounder: Rounder, label: str, damp: float = 0.01,
                 clip_search: bool = True) -> nn.Module:
    """The driver AdaRound and GPTQ share: every quantized Conv/Linear of a converted model, in execution order.

    Per layer (``lowbit.ptq.frontier.visit_layers``: one forward pass in all on captured graphs): capture the
    input moment from the model as it stands (earlier layers already rounded, so the
    rounding also answers everything upstream), add the ridge ``damp + d/n`` (``InputMoments.ridge``),
    re-choose the weight clipping by output error (``clip_search``), round with ``rounder`` and write the
    on-grid weights back (the frozen qparams stay).
    """
    loop = as_forward_loop(forward_loop)
    t0 = time.perf_counter()
    done = 0
    for name, layer, feed in visit_layers(model, loop, quantizable, loop.frontier_bytes, label):
        moments = InputMoments.empty(layer)
        feed(on_input=lambda x, layer=layer, moments=moments: moments.update(layer, effective_input(layer, x)))
        if moments.count == 0:
            raise RuntimeError(f"layer {name} was never called by the calibration data")
        h = moments.damped_second_moment(damp)
        s, z, qmin, qmax = layer_grid(layer)
        w = weight_matrix(layer).detach()
        if clip_search:
            s = refine_weight_scales(layer, w, s, z, qmin, qmax, h)
        q = rounder(w, h, s, z, qmin, qmax)
        before, after = output_error(w, quantize_columns(w, s, z, qmin, qmax), h), output_error(w, q, h)
        log.info("%s %s: output error %.4g with nearest rounding, %.4g after", label, name, before, after)
        with torch.no_grad():
            layer.weight.copy_(q.reshape(layer.weight.shape))
        done += 1
    log.info("%s: %d layers in %.1f s", label, done, time.perf_counter() - t0)
    return model
