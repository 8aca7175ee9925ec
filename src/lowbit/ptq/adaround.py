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


def adaround_weight(weight: torch.Tensor, second_moment: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    qmin: int, qmax: int, cfg: AdaRoundConfig = AdaRoundConfig()) -> torch.Tensor:
    """Learned rounding of ``weight`` (``[G, r, d]``) for inputs with second moment ``E[x xᵀ]`` (``[G, d, d]``).

    Returns:
        ``[G, r, d]`` weights on the grid given by ``scale`` / ``zero_point`` (per element).
    """
    w = weight.detach().float()
    s, z = scale.float(), zero_point.float()
    h_mat = second_moment.float()
    floor = torch.floor(w / s)
    v = init_v(w / s - floor).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    for step in range(cfg.iterations):
        soft = (torch.clamp(floor + rectified_sigmoid(v) + z, qmin, qmax) - z) * s
        delta = w - soft
        recon = (torch.bmm(delta, h_mat) * delta).sum()  # E_x Σ_o (ΔW x)_o²
        beta = beta_at(step, cfg)
        loss = recon
        if beta is not None:
            hv = rectified_sigmoid(v)
            loss = loss + cfg.reg_weight * (1 - torch.abs(2 * hv - 1) ** beta).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
