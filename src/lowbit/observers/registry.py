"""Observer registry: calibrator names (as in ``QuantSpec.calibrator``) to observer classes."""

from __future__ import annotations

from typing import Any

from lowbit.core import PerTensor
from lowbit.core.spec import Granularity
from lowbit.observers.base import Observer
from lowbit.observers.histogram import EntropyObserver, MSEObserver, PercentileObserver
from lowbit.observers.meanstd import MeanStdObserver
from lowbit.observers.minmax import EMAMinMaxObserver, MinMaxObserver

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAMinMaxObserver,
    "meanstd": MeanStdObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(
    calibrator: str, name: str = "observer", granularity: Granularity = PerTensor(), **opts: Any
) -> Observer:
    """Build the observer registered as ``calibrator`` (``minmax``, ``ema``, ``meanstd``, ``percentile``,
    ``entropy``, ``mse``) with the given name, granularity and options.

    Raises:
        ValueError: unknown calibrator name (the message lists the valid ones).
    """
    try:
        cls = OBSERVERS[calibrator]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(OBSERVERS))
        raise ValueError(f"unknown calibrator {calibrator!r}; valid names: {valid}") from None
    return cls(name=name, granularity=granularity, **opts)
