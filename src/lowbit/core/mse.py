"""MSE-optimal scale and zero-point for a tensor, per tensor (``PerTensor()``) or per channel (``PerChannel(axis)``).

Two solvers, both starting from min-max and never returning worse than it:

* :func:`lsq_fit_qparams`, the closed-form least-squares fit of the seed. With the codes ``Q`` fixed, the
  affine model ``R ≈ S (Q - Z)`` is a linear regression of R on Q, so

      S* = cov(R, Q) / var(Q),      Z* = E[Q] - E[R] / S*

  (symmetric: ``S* = E[RQ] / E[Q²]``, ``Z = 0``). Re-quantizing with (S*, round(Z*)) changes Q, so the fit
  is iterated, keeping the best MSE seen (Lloyd-style alternation).
* :func:`grid_search_qparams`, which shrinks the min-max range by clipping ratios ``α`` in
  ``[min_ratio, 1]`` and keeps the α of least ``E[(R - x̂)²]``.
"""

from __future__ import annotations

import torch

from lowbit.core.affine import SCALE_EPS, choose_qparams, quantize, quantize_dequantize
from lowbit.core.spec import Granularity, PerChannel, PerTensor


def _axis(granularity: Granularity) -> int | None:
    """The channel axis of a per-channel granularity, None per tensor (per-group fits are not supported)."""
    if isinstance(granularity, PerTensor):
        return None
    if isinstance(granularity, PerChannel):
        return granularity.axis
    raise ValueError(f"MSE fits are per tensor or per channel, got {granularity}")


def _stats_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    axis = axis % x.ndim
    return tuple(d for d in range(x.ndim) if d != axis)


def _reduce(t: torch.Tensor, op: str, dims: tuple[int, ...]) -> torch.Tensor:
    # torch reduces over *all* dims when given dim=(); a 1-D tensor per-channel along axis 0 has nothing to reduce.
    return getattr(t, op)(dim=dims) if dims else t


def _view(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return p.reshape(shape)


def _mse(x, scale, zp, qmin, qmax, axis) -> torch.Tensor:
    err = quantize_dequantize(x, _view(scale, x, axis), _view(zp, x, axis), qmin, qmax) - x
    return _reduce(err.pow(2), "mean", _stats_dims(x, axis))


def _keep_best(err, scale, zp, best, best_s, best_z):
    """Elementwise (per channel) keep the candidate with the lower MSE."""
    better = err < best
    return torch.where(better, err, best), torch.where(better, scale, best_s), torch.where(better, zp, best_z)


def minmax_qparams(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, granularity: Granularity = PerTensor()):
    """Plain min-max scale and zero-point (per tensor, or per index along the channel axis)."""
    axis = _axis(granularity)
    dims = _stats_dims(x, axis)
    return choose_qparams(_reduce(x, "amin", dims), _reduce(x, "amax", dims), qmin, qmax, symmetric)


def lsq_fit_qparams(
    x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, granularity: Granularity = PerTensor(), iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterated closed-form least-squares scale / zero-point (see module docstring).

    Returns:
        ``(scale, zero_point)`` of the best MSE seen, shaped like the per-channel statistics.
    """
    x = x.detach().float()
    axis = _axis(granularity)
    dims = _stats_dims(x, axis)
    scale, zp = minmax_qparams(x, qmin, qmax, symmetric, granularity)
    best_s, best_z, best = scale, zp, _mse(x, scale, zp, qmin, qmax, axis)
    for _ in range(iters):
        q = quantize(x, _view(scale, x, axis), _view(zp, x, axis), qmin, qmax).float()
        if symmetric:
            scale = _reduce(x * q, "mean", dims) / _reduce(q.pow(2), "mean", dims).clamp(min=1e-12)
            zp = torch.zeros_like(zp)
        else:
            mq, mr = _reduce(q, "mean", dims), _reduce(x, "mean", dims)
            cov = _reduce(x * q, "mean", dims) - mr * mq
            var = _reduce(q.pow(2), "mean", dims) - mq * mq
            scale = cov / var.clamp(min=1e-12)
            zp = torch.clamp(torch.round(mq - mr / scale.clamp(min=SCALE_EPS)), qmin, qmax).to(torch.int64)
        scale = torch.where(torch.isfinite(scale) & (scale > SCALE_EPS), scale, best_s)
        best, best_s, best_z = _keep_best(_mse(x, scale, zp, qmin, qmax, axis), scale, zp, best, best_s, best_z)
    return best_s, best_z


def grid_search_qparams(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    granularity: Granularity = PerTensor(),
    num_candidates: int = 100,
    min_ratio: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero-point of the clipping ratio ``α`` with least MSE, ``range = α · [min, max]``.

    Ratios are ``linspace(min_ratio, 1, num_candidates)``; α = 1 is min-max, so the result is never worse.
    """
    x = x.detach().float()
    axis = _axis(granularity)
    dims = _stats_dims(x, axis)
    lo, hi = _reduce(x, "amin", dims), _reduce(x, "amax", dims)
    best_s, best_z = choose_qparams(lo, hi, qmin, qmax, symmetric)
    best = _mse(x, best_s, best_z, qmin, qmax, axis)
    for ratio in torch.linspace(min_ratio, 1.0, num_candidates).tolist():
        scale, zp = choose_qparams(lo * ratio, hi * ratio, qmin, qmax, symmetric)
        best, best_s, best_z = _keep_best(_mse(x, scale, zp, qmin, qmax, axis), scale, zp, best, best_s, best_z)
    return best_s, best_z
