"""Streaming calibrators with one contract: ``update``, ``compute_range``/``compute_qparams``, ``reset``,
``state``/``merge``; MinMax, EMA MinMax, mean ± kσ and an exact mergeable histogram with pure rules
(percentile, TensorRT entropy, MSE)."""

from lowbit.observers import histogram_rules as rules
from lowbit.observers.base import Observer
from lowbit.observers.histogram import EntropyObserver, HistogramObserver, MSEObserver, PercentileObserver
from lowbit.observers.meanstd import MeanStdObserver
from lowbit.observers.minmax import EMAMinMaxObserver, MinMaxObserver
from lowbit.observers.registry import OBSERVERS, make_observer

__all__ = [
    "OBSERVERS", "EMAMinMaxObserver", "EntropyObserver", "HistogramObserver", "MSEObserver", "MeanStdObserver",
    "MinMaxObserver", "Observer", "PercentileObserver", "make_observer", "rules",
]
