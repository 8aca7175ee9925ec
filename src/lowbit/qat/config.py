"""``QATConfig``: how quantizers and BatchNorm behave during quantization-aware training.

A *step* is one forward pass of the model in training mode; every quantizer and every simulated
BatchNorm counts its own steps (they all see the same number), so the schedule below needs no external
driver and resumes exactly from a checkpoint.

    step < observer_steps   ranges follow an observer (EMA min-max for activations, the recipe's calibrator
                            on the current weight for weights); fake quantization with straight-through x
    step ≥ observer_steps   observers are frozen; with ``learn_ranges`` the ranges become learnable
                            parameters initialised from the observer (LSQ scale, LSQ+ offset)
    step ≥ freeze_bn_step   BatchNorm stops using batch statistics and stops updating its running ones
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_INITS = ("observer", "mse")


@dataclass(frozen=True)
class QATConfig:
    """Quantizer and BatchNorm schedule for QAT.

    Attributes:
        observer_steps: training steps during which ranges come from observers (then observers freeze).
            Ignored when the model starts from PTQ qparams (``prepare_qat_(..., from_ptq=True)``).
        ema_momentum: EMA constant ``c`` of the activation observers, ``m ← m + c·(batch_m − m)``.
        learn_ranges: after ``observer_steps``, learn the ranges (LSQ). False keeps them fixed.
        learn_offset: for asymmetric specs also learn the zero-point as a float offset (LSQ+).
        grad_scaling: multiply range gradients by ``g = 1 / sqrt(N · qmax)`` with ``N`` the number of
            elements per scale (LSQ); without it ``g = 1``.
        freeze_bn_step: from this training step on, simulated BatchNorm uses (and keeps) its running
            statistics; ``None`` never freezes them.
        weight_init: where learnable weight ranges start: ``observer`` (the observer's / PTQ's qparams) or
            ``mse`` (the clipping of least squared error, ``core.grid_search_qparams``; better below 4 bits).
    """

    observer_steps: int = 50
    ema_momentum: float = 0.05
    learn_ranges: bool = True
    learn_offset: bool = True
    grad_scaling: bool = True
    freeze_bn_step: int | None = None
    weight_init: str = "observer"

    def __post_init__(self) -> None:
        if isinstance(self.observer_steps, bool) or not isinstance(self.observer_steps, int) or self.observer_steps < 0:
            raise ValueError(f"QATConfig.observer_steps must be an integer >= 0, got {self.observer_steps!r}")
        if not 0.0 < float(self.ema_momentum) <= 1.0:
            raise ValueError(f"QATConfig.ema_momentum must be in (0, 1], got {self.ema_momentum!r}")
        if self.freeze_bn_step is not None and (
            isinstance(self.freeze_bn_step, bool) or not isinstance(self.freeze_bn_step, int) or self.freeze_bn_step < 0
        ):
            raise ValueError(f"QATConfig.freeze_bn_step must be None or an integer >= 0, got {self.freeze_bn_step!r}")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"QATConfig.weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
        for name in ("learn_ranges", "learn_offset", "grad_scaling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QATConfig.{name} must be True or False, got {getattr(self, name)!r}")
