"""Running min/max and its exponential moving average (torch.ao's MinMax / MovingAverageMinMax observers)."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec, group_view
from lowbit.observers.base import Observer, row_extrema


def _group_extrema(x: torch.Tensor, mask: torch.Tensor | None, granularity: PerGroup) -> tuple[torch.Tensor, ...]:
    """Min and max of every group of ``size`` consecutive elements along ``axis``.

    The result has ``x``'s shape with ``shape[axis]`` replaced by ``ceil(shape[axis] / size)`` (the layout
    ``expand_qparams`` expects). A ragged last group is padded by repeating its last slice, so the padding
    never changes a min or max (``group_view`` itself pads with zeros).
    """
    if x.ndim == 0:
        raise ValueError("per-group statistics need a tensor with at least one dimension")
    axis = granularity.axis % x.ndim
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    x_lo = x if mask is None else torch.where(mask, x, inf)
    x_hi = x if mask is None else torch.where(mask, x, -inf)
    n = x.shape[axis]
    pad = (-n) % granularity.size
    out = []
    for src, reduce in ((x_lo, torch.amin), (x_hi, torch.amax)):
        if pad:
            tail = src.narrow(axis, n - 1, 1)
            src = torch.cat([src, tail.expand(*[pad if d == axis else -1 for d in range(x.ndim)])], dim=axis)
        out.append(reduce(group_view(src, granularity), dim=axis + 1))
    return tuple(out)


def _check_shape(name: str, old: torch.Tensor, new: torch.Tensor) -> None:
    if old.shape != new.shape:
        raise ValueError(
            f"observer {name!r}: statistics shape changed from {tuple(old.shape)} to {tuple(new.shape)} "
            "(per-channel / per-group observers need batches with the same channel layout)"
        )


def _finite_range(name: str, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise RuntimeError(f"observer {name!r} saw no finite data for some channels / groups")
    return lo.clone(), hi.clone()


class MinMaxObserver(Observer):
    """Running minimum and maximum: ``min ← min(min, batch_min)``, ``max ← max(max, batch_max)``.

    PerTensor gives scalars, PerChannel(axis) ``[C]`` tensors, PerGroup(size, axis) the per-group layout of
    ``expand_qparams``. Merging is exact (the min of the mins, the max of the maxes).
    """

    calibrator = "minmax"
    granularities = (PerTensor, PerChannel, PerGroup)

    def __init__(self, name: str = "observer", granularity=PerTensor(), nan_policy: str = "raise") -> None:
        super().__init__(name, granularity, nan_policy)

    def _reset_stats(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _batch_extrema(self, x, mask, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.granularity, PerGroup):
            return _group_extrema(x, mask, self.granularity)
        return row_extrema(x, mask, self.granularity, lo, hi)

    def _observe(self, x, mask, lo, hi) -> None:
        b_lo, b_hi = self._batch_extrema(x, mask, lo, hi)
        if self.min_val is None:
            self.min_val, self.max_val = b_lo.clone(), b_hi.clone()
            return
        _check_shape(self.name, self.min_val, b_lo)
        self.min_val = torch.minimum(self.min_val, b_lo.to(self.min_val.device))
        self.max_val = torch.maximum(self.max_val, b_hi.to(self.max_val.device))

    def _compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return _finite_range(self.name, self.min_val, self.max_val)

    def _stats_state(self) -> dict[str, Any]:
        return {"min": self.min_val.detach().cpu().clone(), "max": self.max_val.detach().cpu().clone()}

    def _set_stats(self, stats: dict[str, Any]) -> None:
        self.min_val, self.max_val = stats["min"].float(), stats["max"].float()

    def _merge_stats(self, stats: dict[str, Any]) -> None:
        lo, hi = stats["min"].to(self.min_val), stats["max"].to(self.max_val)
        _check_shape(self.name, self.min_val, lo)
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)


class EMAMinMaxObserver(Observer):
    """Exponential moving average of the batch min and max (torch.ao ``MovingAverageMinMaxObserver``).

    The first batch sets ``m = batch_m``; every later batch does ``m ← m + c·(batch_m − m)`` with
    ``c = momentum``, for ``m`` the min and the max alike (per tensor, or per channel for PerChannel).

    Exact merge. One EMA step is the affine map ``m ↦ (1 − c)·m + c·v``. A stream ``b`` of ``n_b`` batches
    with batch values ``v_1 .. v_n`` on its own starts at ``v_1`` and ends at

        m_b = (1 − c)^(n_b − 1)·v_1 + S,      S = Σ_{t=2..n_b} c·(1 − c)^(n_b − t)·v_t.

    Fed after stream ``a`` (final value ``m_a``), ``v_1`` is no longer a start but an EMA step:
    ``(1 − c)·m_a + c·v_1 = v_1 + (1 − c)·(m_a − v_1)``, and the remaining ``n_b − 1`` steps scale that
    by ``(1 − c)^(n_b − 1)`` and add the same ``S``. Hence

        m_ab = (1 − c)^(n_b − 1)·(v_1 + (1 − c)·(m_a − v_1)) + S = (1 − c)^(n_b)·(m_a − v_1) + m_b.

    So the state keeps ``n`` (number of batches), the first batch's min/max ``v_1`` and the current
    min/max; the merged state has ``n_a + n_b`` batches and ``a``'s first values (computed in float64).

    Args:
        momentum: the averaging constant ``c`` in (0, 1] (torch.ao's ``averaging_constant``).
    """

    calibrator = "ema"
    granularities = (PerTensor, PerChannel)

    def __init__(
        self, name: str = "observer", granularity=PerTensor(), nan_policy: str = "raise", momentum: float = 0.01
    ) -> None:
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        super().__init__(name, granularity, nan_policy, momentum=float(momentum))
        self.momentum = float(momentum)

    def _reset_stats(self) -> None:
        self.batches = 0
        self.first_min: torch.Tensor | None = None
        self.first_max: torch.Tensor | None = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x, mask, lo, hi) -> None:
        b_lo, b_hi = row_extrema(x, mask, self.granularity, lo, hi)
        if not bool(torch.isfinite(b_lo).all()):
            raise ValueError(f"observer {self.name!r}: a channel has no finite value in this batch")
        if self.batches == 0:
            self.first_min, self.first_max = b_lo.clone(), b_hi.clone()
            self.min_val, self.max_val = b_lo.clone(), b_hi.clone()
        else:
            _check_shape(self.name, self.min_val, b_lo)
            b_lo, b_hi = b_lo.to(self.min_val.device), b_hi.to(self.max_val.device)
            c = self.momentum
            self.min_val = self.min_val + c * (b_lo - self.min_val)
            self.max_val = self.max_val + c * (b_hi - self.max_val)
        self.batches += 1

    def _compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def _stats_state(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            **{k: getattr(self, k).detach().cpu().clone() for k in ("first_min", "first_max", "min_val", "max_val")},
        }

    def _set_stats(self, stats: dict[str, Any]) -> None:
        self.batches = int(stats["batches"])
        for key in ("first_min", "first_max", "min_val", "max_val"):
            setattr(self, key, stats[key].float())

    def _merge_stats(self, stats: dict[str, Any]) -> None:
        _check_shape(self.name, self.min_val, stats["min_val"])
        decay = (1.0 - self.momentum) ** int(stats["batches"])
        for key, first in (("min_val", "first_min"), ("max_val", "first_max")):
            mine = getattr(self, key)
            first_b, final_b = stats[first].to(mine.device).double(), stats[key].to(mine.device).double()
            setattr(self, key, (decay * (mine.double() - first_b) + final_b).float())
        self.batches += int(stats["batches"])
