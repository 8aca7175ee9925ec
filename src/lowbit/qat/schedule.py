"""The QAT learning-rate schedule of the seed, in three phases of the run (fractions of the total steps):

    0 ≤ t < 0.3:    low constant rate, ``low_factor · base`` (the seed: ~1e-5), while the ranges settle
    0.3 ≤ t < 0.7:  linear rise from ``low_factor · base`` to ``peak_factor · base`` (the seed: base / 3)
    0.7 ≤ t ≤ 1:    cosine decay from ``peak_factor · base`` to ``final_factor · base``

    factor(t) = low                                          t < w
              = low + (peak − low) · (t − w) / (r − w)       w ≤ t < r
              = final + (peak − final) · (1 + cos(π·u)) / 2, u = (t − r) / (1 − r)   otherwise

with ``t = step / total_steps``, ``w = warm_end``, ``r = rise_end``. ``base`` is the optimizer's learning rate
(AdamW in the examples); :meth:`ThreePhaseSchedule.scheduler` wraps it in a ``LambdaLR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreePhaseSchedule:
    """Learning-rate factor of the three-phase QAT schedule (see module docstring)."""

    total_steps: int
    low_factor: float = 0.01
    peak_factor: float = 1.0 / 3.0
    final_factor: float = 0.0
    warm_end: float = 0.3
    rise_end: float = 0.7

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"ThreePhaseSchedule.total_steps must be a positive integer, got {self.total_steps!r}")
        if not 0.0 <= self.warm_end <= self.rise_end <= 1.0:
            raise ValueError(f"ThreePhaseSchedule needs 0 <= warm_end <= rise_end <= 1, got {self.warm_end}, {self.rise_end}")
        for name in ("low_factor", "peak_factor", "final_factor"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"ThreePhaseSchedule.{name} must be >= 0, got {getattr(self, name)!r}")

    def __call__(self, step: int) -> float:
        """The factor at ``step`` (the ``LambdaLR`` contract)."""
        return self.factor(step)

    def factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step`` (0-based); steps past the end keep the final value."""
        t = min(max(step, 0) / self.total_steps, 1.0)
        if t < self.warm_end:
            return self.low_factor
        if t < self.rise_end:
            return self.low_factor + (self.peak_factor - self.low_factor) * (t - self.warm_end) / (self.rise_end - self.warm_end)
        u = 1.0 if self.rise_end >= 1.0 else (t - self.rise_end) / (1.0 - self.rise_end)
        return self.final_factor + (self.peak_factor - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * u))

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` applying this schedule to every parameter group (call ``.step()`` after each step)."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self)
