"""Mean ± k standard deviations (the seed's "online calibrator"), exact or exponentially averaged."""

from __future__ import annotations

from typing import Any

import torch

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.observers.base import Observer, as_rows, row_extrema

_F64 = torch.float64


_CHUNK = 1 << 20  # elements per pass of the exact moments (scratch buffers stay in cache)


def batch_moments(
    x: torch.Tensor, mask: torch.Tensor | None, granularity
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(n, mean, M2)`` in float64 of the finite values, ``M2 = Σ (x − mean)²``.

    Rows are one per channel (PerChannel) or a single row (PerTensor); shapes are ``[C]``. Each slab of
    about ``_CHUNK`` elements gets a two-pass mean and ``M2`` in float32 (no cancellation however large the
    offset), and the slabs are combined in float64 with :func:`chan_combine`.
    """
    rows = as_rows(x, granularity)
    if mask is not None:
        return _masked_moments(rows, as_rows(mask, granularity))
    n_rows, n_cols = rows.shape
    step = max(1, _CHUNK // n_rows)
    buf = torch.empty(n_rows, min(step, n_cols), dtype=rows.dtype, device=rows.device)
    total = None
    for start in range(0, n_cols, step):
        part = rows[:, start : start + step]
        width = part.shape[1]
        mean = part.sum(dim=1) / width
        dev = torch.sub(part, mean[:, None], out=buf[:, :width])
        m2 = dev.mul_(dev).sum(dim=1)
        n = torch.full((n_rows,), float(width), dtype=_F64, device=rows.device)
        moments = (n, mean.to(_F64), m2.to(_F64))
        total = moments if total is None else chan_combine(total, moments)
    return total


def _masked_moments(rows: torch.Tensor, rmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    zero = torch.zeros((), dtype=rows.dtype, device=rows.device)
    n = rmask.sum(dim=1).to(_F64)
    mean = torch.where(rmask, rows, zero).sum(dim=1, dtype=_F64) / n.clamp(min=1.0)
    dev = torch.where(rmask, rows - mean.to(rows.dtype)[:, None], zero)
    # Σ(x − μ̃)² with μ̃ = float32(μ) exceeds Σ(x − μ)² by n·(μ̃ − μ)²; remove it.
    m2 = dev.pow(2).sum(dim=1, dtype=_F64) - n * (mean.to(rows.dtype).to(_F64) - mean) ** 2
    return n, mean, m2.clamp(min=0.0)


def chan_combine(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Chan et al.'s parallel update of ``(n, mean, M2)``.

        n = n_a + n_b,   δ = mean_b − mean_a,
        mean = mean_a + δ·n_b / n,
        M2 = M2_a + M2_b + δ²·n_a·n_b / n.

    Rows with ``n_b = 0`` are left unchanged.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    w_b = n_b / n.clamp(min=1.0)
    delta = torch.where(n_b > 0, mean_b - mean_a, torch.zeros_like(mean_a))
    return n, mean_a + delta * w_b, m2_a + m2_b + delta**2 * n_a * w_b


class MeanStdObserver(Observer):
    """Range ``[μ − kσ, μ + kσ] ∩ [min, max]`` from streaming moments.

    ``momentum=None``: exact mean and population variance ``σ² = M2 / n`` over every element seen, folded
    batch by batch with Chan's parallel formula (see :func:`chan_combine`), which also merges states.

    ``momentum=β`` (the seed's online calibrator): the first batch sets ``μ = batch_mean``,
    ``σ² = batch_var`` (population variance); later batches do

        μ ← β·μ + (1 − β)·batch_mean,      σ² ← β·σ² + (1 − β)·batch_var.

    Each step is the affine map ``m ↦ β·m + (1 − β)·v``, so (as for :class:`EMAMinMaxObserver` with
    ``c = 1 − β``) appending a stream ``b`` of ``n_b`` batches whose first batch value is ``v_1`` and whose
    final value alone is ``m_b`` gives ``m_ab = β^(n_b)·(m_a − v_1) + m_b``; the state keeps the batch
    count and first values to merge exactly.

    The exact min and max are always tracked; the result is clipped to them.

    Args:
        k: number of standard deviations (> 0).
        momentum: None for exact statistics, or β in [0, 1).
    """

    calibrator = "meanstd"
    granularities = (PerTensor, PerChannel)

    def __init__(
        self,
        name: str = "observer",
        granularity=PerTensor(),
        nan_policy: str = "raise",
        k: float = 3.0,
        momentum: float | None = None,
    ) -> None:
        if not float(k) > 0.0:
            raise ValueError(f"k must be > 0, got {k!r}")
        if momentum is not None and not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be None or in [0, 1), got {momentum!r}")
        momentum = None if momentum is None else float(momentum)
        super().__init__(name, granularity, nan_policy, k=float(k), momentum=momentum)
        self.k, self.momentum = float(k), momentum

    def _reset_stats(self) -> None:
        self.stats: dict[str, Any] = {}

    def _observe(self, x, mask, lo, hi) -> None:
        b_lo, b_hi = (t.reshape(-1) for t in row_extrema(x, mask, self.granularity, lo, hi))
        moments = batch_moments(x, mask, self.granularity)
        st = self.stats
        if st and st["mean"].shape != moments[1].shape:
            raise ValueError(f"observer {self.name!r}: channel count changed from {st['mean'].numel()}")
        if self.momentum is None:
            self._observe_exact(moments)
        else:
            self._observe_ema(moments)
        st["min"] = b_lo.clone() if "min" not in st else torch.minimum(st["min"], b_lo.to(st["min"].device))
        st["max"] = b_hi.clone() if "max" not in st else torch.maximum(st["max"], b_hi.to(st["max"].device))

    def _observe_exact(self, moments) -> None:
        st = self.stats
        if not st:
            st["n"], st["mean"], st["m2"] = moments
            return
        dev = st["mean"].device
        st["n"], st["mean"], st["m2"] = chan_combine(
            (st["n"], st["mean"], st["m2"]), tuple(t.to(dev) for t in moments)
        )

    def _observe_ema(self, moments) -> None:
        n, mean, m2 = moments
        if not bool((n > 0).all()):
            raise ValueError(f"observer {self.name!r}: a channel has no finite value in this batch")
        var = m2 / n
        st = self.stats
        if not st:
            st.update(batches=1, first_mean=mean, first_var=var, mean=mean.clone(), var=var.clone())
            return
        beta = self.momentum
        st["mean"] = beta * st["mean"] + (1.0 - beta) * mean.to(st["mean"].device)
        st["var"] = beta * st["var"] + (1.0 - beta) * var.to(st["var"].device)
        st["batches"] += 1

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(μ, σ)`` in float64 (``[1]`` for PerTensor, ``[C]`` for PerChannel)."""
        if not self.stats:
            raise RuntimeError(f"observer {self.name!r} saw no data")
        st = self.stats
        var = st["var"] if self.momentum is not None else st["m2"] / st["n"].clamp(min=1.0)
        return st["mean"], var.clamp(min=0.0).sqrt()

    def _compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.mean_std()
        lo = torch.maximum(mean - self.k * std, self.stats["min"].to(_F64)).float()
        hi = torch.minimum(mean + self.k * std, self.stats["max"].to(_F64)).float()
        if isinstance(self.granularity, PerTensor):
            lo, hi = lo.reshape(()), hi.reshape(())
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise RuntimeError(f"observer {self.name!r} saw no finite data for some channels")
        return lo, hi

    def _stats_state(self) -> dict[str, Any]:
        return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in self.stats.items()}

    def _set_stats(self, stats: dict[str, Any]) -> None:
        self.stats = dict(stats)

    def _merge_stats(self, stats: dict[str, Any]) -> None:
        st = self.stats
        dev = st["mean"].device
        other = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in stats.items()}
        if other["mean"].shape != st["mean"].shape:
            raise ValueError(f"observer {self.name!r}: cannot merge statistics of another channel count")
        st["min"] = torch.minimum(st["min"], other["min"])
        st["max"] = torch.maximum(st["max"], other["max"])
        if self.momentum is None:
            st["n"], st["mean"], st["m2"] = chan_combine(
                (st["n"], st["mean"], st["m2"]), (other["n"], other["mean"], other["m2"])
            )
            return
        decay = self.momentum ** int(other["batches"])
        st["mean"] = decay * (st["mean"] - other["first_mean"]) + other["mean"]
        st["var"] = decay * (st["var"] - other["first_var"]) + other["var"]
        st["batches"] += int(other["batches"])
