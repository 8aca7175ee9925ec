"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., 2020).

Each weight becomes ``W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z)`` with a learned rectified
sigmoid ``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)`` (``ζ = 1.1``, ``γ = −0.1``), trained per layer on

    L = E_x ‖(W − W̃) x‖² + λ Σ (1 − |2h(V) − 1|^β)

where the first term is computed exactly from the captured input moment, ``Σ_g tr(ΔW_g E[x xᵀ] ΔW_gᵀ)``
(see ``lowbit.ptq.capture``; no activations are stored), and ``β`` anneals from 20 to 2 after a warm-up
without regulariser, driving every ``h`` to 0 or 1. The final weights are the hard rounding ``h = [V ≥ 0]``,
on the layer's frozen grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.ptq.weight_range import round_layers

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Optimisation settings (AdaRound paper defaults except the shorter schedule).

    Args:
        iterations: Adam steps per layer.
        lr: Adam learning rate on ``V``.
        reg_weight: ``λ``, weight of the rounding regulariser.
        beta: ``(start, end)`` of the annealed exponent.
        warmup: fraction of the steps without regulariser.
    """

    iterations: int = 1000
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"AdaRoundConfig.iterations must be >= 1, got {self.iterations}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"AdaRoundConfig.warmup must be in [0, 1), got {self.warmup}")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError("AdaRoundConfig.lr must be > 0 and reg_weight >= 0")


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V)`` equal to the fractional part ``rest = W/s − ⌊W/s⌋`` (so training starts at ``W``)."""
    p = torch.clamp((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def beta_at(step: int, cfg: AdaRoundConfig) -> float | None:
    """Annealed ``β`` at ``step``, or None during warm-up (no regulariser)."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    frac = (step - start) / max(1, cfg.iterations - start)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * (1 - frac)


def curvature_factor(h: torch.Tensor, rel_tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split ``H = F Fᵀ + c·I`` exactly, with ``F`` of small rank, or None when that is not cheaper.

    ``H`` (``[G, d, d]``, symmetric) has eigenvalues ``e₁ ≤ … ≤ e_d``; with ``c = e₁``,
    ``H = V diag(e − c) Vᵀ + c·I``, and the eigen-directions with ``e_i − c ≤ rel_tol · e_d`` (numerically the
    ridge alone) are dropped. A layer fed fewer input patches ``n`` than it has inputs ``d`` (a classifier
    after global pooling) has rank ``k ≤ n ≪ d``, and ``tr(ΔHΔᵀ) = ‖ΔF‖² + c‖Δ‖²`` costs ``r·d·k``
    instead of ``r·d²``.

    Returns:
        ``(F [G, d, k], c [G, 1, 1])`` in float32, or None when ``k > d / 2``.
    """
    e, v = torch.linalg.eigh(h.double())  # ascending
    c = e[:, :1]
    rest = (e - c).clamp_min(0.0)
    keep = rest > rel_tol * e[:, -1:].abs()
    k = int(keep.sum(dim=-1).max())
    d = h.shape[-1]
    if k > d // 2:
        return None
    f = v[..., d - k:] * rest[:, None, d - k:].sqrt() if k else h.new_zeros(h.shape[0], d, 0).double()
    return f.float(), c.float().unsqueeze(-1)


def curvature_product(h: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``Δ ↦ Δ·H`` for ``Δ`` of shape ``[G, rows, d]``, through :func:`curvature_factor` when that is cheaper."""
    g, d = h.shape[0], h.shape[-1]
    split = curvature_factor(h) if d >= 64 else None
    if split is None:
        hf = h.float()
        if g > 64 and g * rows * d * d <= 2**24:  # many tiny groups (depthwise): a broadcast beats bmm
            return lambda delta: (delta.unsqueeze(-1) * hf.unsqueeze(1)).sum(dim=-2)
        return lambda delta: torch.bmm(delta, hf)
    f, c = split
    ft = f.transpose(1, 2).contiguous()
    return lambda delta: torch.bmm(torch.bmm(delta, f), ft) + c * delta


def adaround_grad(v: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, base: torch.Tensor, qmin: int,
                  qmax: int, times_h: Callable[[torch.Tensor], torch.Tensor], beta: float | None,
                  reg_weight: float) -> torch.Tensor:
    """``∂L/∂V`` written out (no autograd; one ``Δ·H`` product). With ``base = ⌊W/s⌋ + z``,
    ``W̃ = s·(clamp(base + h, qmin, qmax) − z)`` and ``Δ = W − W̃``::

        ∂L/∂h = −2 s (ΔH) · [qmin ≤ base + h ≤ qmax]  −  2λβ |2h − 1|^(β−1) sign(2h − 1)   (λ term after warm-up)
        ∂h/∂V = (ζ − γ) σ(V)(1 − σ(V)) · [0 ≤ σ(V)(ζ − γ) + γ ≤ 1]

    (the masks are where ``clamp`` passes gradient, as autograd does).
    """
    span = ZETA - GAMMA
    sig = torch.sigmoid(v)
    raw = sig * span + GAMMA
    hv = raw.clamp(0.0, 1.0)
    codes = base + hv
    delta = w - (codes.clamp(qmin, qmax) - z) * s
    grad = times_h(delta).mul_(-2.0 * s).mul_((codes >= qmin) & (codes <= qmax))
    if beta is not None and reg_weight:
        t = 2.0 * hv - 1.0
        grad -= (2.0 * reg_weight * beta) * t.abs().pow(beta - 1.0) * torch.sign(t)
    return grad.mul_(sig * (1.0 - sig) * span).mul_((raw >= 0.0) & (raw <= 1.0))


def adaround_weight(weight: torch.Tensor, second_moment: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    qmin: int, qmax: int, cfg: AdaRoundConfig = AdaRoundConfig()) -> torch.Tensor:
    """Learned rounding of ``weight`` (``[G, r, d]``) for inputs with second moment ``E[x xᵀ]`` (``[G, d, d]``):
    Adam on ``V`` with :func:`adaround_grad`.

    Returns:
        ``[G, r, d]`` weights on the grid given by ``scale`` / ``zero_point`` (per element).
    """
    w = weight.detach().float()
    s, z = scale.float(), zero_point.float()
    times_h = curvature_product(second_moment, w.shape[1])
    floor = torch.floor(w / s)
    base = floor + z
    v = init_v(w / s - floor).detach().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr, fused=True)  # one kernel per step (5x faster than the default on CPU)
    for step in range(cfg.iterations):
        with torch.no_grad():
            v.grad = adaround_grad(v, w, s, z, base, qmin, qmax, times_h, beta_at(step, cfg), cfg.reg_weight)
        opt.step()
    with torch.no_grad():
        hard = (v >= 0).float()
        return ((torch.clamp(floor + hard + z, qmin, qmax) - z) * s).to(weight.dtype)


def apply(model: nn.Module, forward_loop, config: AdaRoundConfig = AdaRoundConfig(), clip_search: bool = True) -> nn.Module:
    """AdaRound on every quantized Conv/Linear of a converted model, in execution order (see
    ``weight_range.round_layers`` for the per-layer steps: capture, ridge, clipping, rounding)."""
    def rounder(w, h, s, z, qmin, qmax):
        return adaround_weight(w, h, s, z, qmin, qmax, config)

    return round_layers(model, forward_loop, rounder, "adaround", clip_search=clip_search)
