"""The observer contract shared by every calibrator.

An observer streams batches (``update``), never keeps raw data, and turns what it saw into a range
``(lo, hi)`` and quantization parameters for a :class:`~lowbit.core.QuantSpec`::

    obs.update(x)                       # any number of batches
    lo, hi = obs.compute_range(spec)    # scalar tensors, [C] per channel, per-group shaped per group
    scale, zp = obs.compute_qparams(spec)   # = choose_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)

``state()`` / ``merge()`` let statistics gathered in several processes combine: after
``a.merge(b.state())`` the observer ``a`` equals one observer that saw ``a``'s stream, then ``b``'s.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec, choose_qparams
from lowbit.core.spec import Granularity

logger = logging.getLogger(__name__)

NAN_POLICIES = ("raise", "ignore")


def granularity_to_dict(granularity: Granularity) -> dict[str, Any]:
    """Plain-value description of a granularity (for ``state()``), e.g. ``{"kind": "per_channel", "axis": 0}``."""
    if isinstance(granularity, PerTensor):
        return {"kind": "per_tensor"}
    if isinstance(granularity, PerChannel):
        return {"kind": "per_channel", "axis": granularity.axis}
    if isinstance(granularity, PerGroup):
        return {"kind": "per_group", "size": granularity.size, "axis": granularity.axis}
    raise ValueError(f"granularity must be PerTensor, PerChannel or PerGroup, got {granularity!r}")


def as_rows(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View ``x`` as ``[C, K]``: one row per channel (PerChannel(axis)) or a single row (PerTensor)."""
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)
    if x.ndim == 0:
        raise ValueError("per-channel statistics need a tensor with at least one dimension")
    axis = granularity.axis % x.ndim
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Base class of all streaming calibrators.

    Subclasses implement ``_observe`` (fold one screened batch into the statistics), ``_compute_range``,
    ``_reset_stats``, ``_stats_state`` and ``_merge_stats``; this class owns the common contract: input
    screening (NaN/Inf policy), element counting, granularity checks, state bookkeeping and errors.

    Args:
        name: used in error and log messages, e.g. the module path ``"features.3.conv"``.
        granularity: ``PerTensor()``, ``PerChannel(axis)`` or ``PerGroup(size, axis)`` (subclasses list
            which they support in ``granularities``).
        nan_policy: ``"raise"`` (a batch with NaN/Inf raises ValueError) or ``"ignore"`` (non-finite
            values are counted in ``nan_count`` and skipped).
        **opts: subclass options; recorded so that ``merge`` can refuse states gathered with other options.

    Attributes:
        seen: number of finite elements folded into the statistics.
        nan_count: number of NaN/Inf elements skipped (``nan_policy="ignore"``).
    """

    calibrator: ClassVar[str] = "observer"
    granularities: ClassVar[tuple[type, ...]] = (PerTensor,)

    def __init__(
        self,
        name: str = "observer",
        granularity: Granularity = PerTensor(),
        nan_policy: str = "raise",
        **opts: Any,
    ) -> None:
        if not isinstance(granularity, self.granularities):
            allowed = ", ".join(g.__name__ for g in self.granularities)
            raise ValueError(f"{type(self).__name__} supports granularity {allowed}; got {granularity!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.name = name
        self.granularity = granularity
        self.nan_policy = nan_policy
        self.options: dict[str, Any] = dict(opts)
        self._seen = 0
        self._nan_count = 0
        self._reset_stats()

    # ------------------------------------------------------------------ public contract
    @property
    def seen(self) -> int:
        """Number of finite elements seen so far."""
        return self._seen

    @property
    def nan_count(self) -> int:
        """Number of NaN/Inf elements skipped so far."""
        return self._nan_count

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the statistics (detached, as float32); the batch itself is not kept.

        Raises:
            ValueError: ``x`` has NaN/Inf values and ``nan_policy="raise"``.
        """
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            return
        mask, lo, hi = self._screen(x)
        if lo is None:
            return
        self._follow(x.device)
        self._observe(x, mask, lo, hi)
        self._seen += x.numel() if mask is None else int(mask.sum())

    def compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Range ``(lo, hi)`` to quantize with ``spec`` (float32 tensors shaped by the granularity).

        Raises:
            RuntimeError: no data was seen yet.
            ValueError: ``spec.granularity`` differs from the observer's.
        """
        if self._seen == 0:
            raise RuntimeError(f"observer {self.name!r} saw no data")
        if spec.granularity != self.granularity:
            raise ValueError(
                f"observer {self.name!r} collects {self.granularity!r} statistics, spec asks for {spec.granularity!r}"
            )
        return self._compute_range(spec)

    def compute_qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``choose_qparams(*compute_range(spec), spec.qmin, spec.qmax, spec.symmetric)``."""
        lo, hi = self.compute_range(spec)
        return choose_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)

    def reset(self) -> None:
        """Forget everything seen (options are kept)."""
        self._seen = 0
        self._nan_count = 0
        self._reset_stats()

    def state(self) -> dict[str, Any]:
        """Plain picklable description of the statistics: strings, numbers, dicts and CPU tensors."""
        return {
            "observer": self.calibrator,
            "granularity": granularity_to_dict(self.granularity),
            "options": dict(self.options),
            "seen": self._seen,
            "nan_count": self._nan_count,
            "stats": self._stats_state() if self._seen else None,
        }

    def merge(self, other_state: dict[str, Any]) -> None:
        """In place: become one observer that saw this observer's stream, then the other's.

        Raises:
            ValueError: the state comes from another observer class, granularity or options.
        """
        self._check_compatible(other_state)
        self._nan_count += int(other_state["nan_count"])
        if not other_state["seen"]:
            return
        if self._seen:
            self._merge_stats(other_state["stats"])
        else:
            self._load_stats(other_state["stats"])
        self._seen += int(other_state["seen"])

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace the statistics by ``state`` (``reset()`` then ``merge(state)``)."""
        self.reset()
        self.merge(state)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(name={self.name!r}, granularity={self.granularity!r}{opts}, seen={self._seen})"

    # ------------------------------------------------------------------ helpers for subclasses
    def _screen(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Apply the NaN policy; return ``(finite mask or None, min, max)`` of the finite values.

        ``min``/``max`` are None when the batch has no finite value (nothing to observe).
        """
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return None, lo, hi
        mask = torch.isfinite(x)
        bad = x.numel() - int(mask.sum())
        if self.nan_policy == "raise":
            raise ValueError(
                f"observer {self.name!r} got {bad} NaN/Inf values in a batch of {x.numel()} elements; "
                "pass nan_policy='ignore' to count and skip them"
            )
        self._nan_count += bad
        logger.debug("observer %r skipped %d NaN/Inf values", self.name, bad)
        if bad == x.numel():
            return mask, None, None
        lo, hi = torch.aminmax(x[mask])
        return mask, lo, hi

    def _follow(self, device: torch.device) -> None:
        """Move the statistics (tensor attributes, and tensors in dict attributes) to ``device``, the device of
        the batches: statistics loaded from a CPU state keep up with a model moved to CUDA."""
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, key, value.to(device))
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, torch.Tensor) and v.device != device:
                        value[k] = v.to(device)

    def _check_compatible(self, other: dict[str, Any]) -> None:
        if not isinstance(other, dict) or "observer" not in other:
            raise ValueError(f"observer {self.name!r} cannot merge {type(other).__name__}: not an observer state")
        mine = {"observer": self.calibrator, "granularity": granularity_to_dict(self.granularity),
                "options": self.options}
        for key, value in mine.items():
            if other.get(key) != value:
                raise ValueError(
                    f"observer {self.name!r} cannot merge a state with {key}={other.get(key)!r} (mine: {value!r})"
                )

    def _load_stats(self, stats: dict[str, Any]) -> None:
        """Adopt ``stats`` as they are (merge into an empty observer). Subclasses may override."""
        self._set_stats({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()})

    # ------------------------------------------------------------------ subclass hooks
    def _reset_stats(self) -> None:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor, mask: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute_range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _stats_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _set_stats(self, stats: dict[str, Any]) -> None:
        raise NotImplementedError

    def _merge_stats(self, stats: dict[str, Any]) -> None:
        raise NotImplementedError


def row_extrema(
    x: torch.Tensor, mask: torch.Tensor | None, granularity: Granularity, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(min, max)`` of the finite values for PerTensor (scalars, reusing ``lo``/``hi``) or PerChannel ([C]).

    A channel without any finite value gets ``(+inf, -inf)``.
    """
    if isinstance(granularity, PerTensor):
        return lo, hi
    rows = as_rows(x, granularity)
    if mask is None:
        return torch.aminmax(rows, dim=1)
    rmask = as_rows(mask, granularity)
    inf = torch.tensor(float("inf"), dtype=rows.dtype, device=rows.device)
    return torch.where(rmask, rows, inf).amin(dim=1), torch.where(rmask, rows, -inf).amax(dim=1)
