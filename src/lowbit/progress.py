"""Progress of long steps: the library reports, whoever installed a sink shows it.

Library code wraps its loops in :func:`progress_steps` (calibration batches, passes, QAT steps, analysis
sweeps). Without a sink nothing is drawn and the step's duration is logged at INFO when it ends; the command
line installs a sink (:func:`progress_sink`) that draws rich progress bars with the time left.

>>> seen = []
>>> with progress_sink(lambda event: seen.append((event.description, event.done, event.total))):
...     for _ in progress_steps(range(2), "calibrating"):
...         pass
>>> seen
[('calibrating', 0, 2), ('calibrating', 1, 2), ('calibrating', 2, 2)]
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """One report of a step: ``done`` of ``total`` units (``total`` None when unknown); ``finished`` once."""

    key: int
    description: str
    done: int
    total: int | None
    finished: bool = False


Sink = Callable[[ProgressEvent], None]
_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("lowbit_progress_sink", default=None)
_NEXT_KEY = iter(range(1, 1 << 62))


@contextlib.contextmanager
def progress_sink(sink: Sink | None) -> Iterator[None]:
    """Send every :class:`ProgressEvent` reported inside the block to ``sink`` (None: report nothing)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def _length(items: Any) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None


def progress_steps(items: Iterable[T], description: str, total: int | None = None,
                   enabled: bool = True) -> Iterator[T]:
    """Yield ``items``, reporting one unit of progress per item to the installed sink.

    Args:
        items: what the loop iterates over.
        description: the step, e.g. ``"calibrating"`` (shown beside the bar and in the log line).
        total: number of items (default ``len(items)`` when it has one).
        enabled: False reports nothing (e.g. ``calibrate(show_progress=False)``).
    """
    sink = _SINK.get() if enabled else None
    total = _length(items) if total is None else total
    key, done, t0 = next(_NEXT_KEY), 0, time.perf_counter()
    if sink is not None:
        sink(ProgressEvent(key, description, 0, total))
    try:
        for item in items:
            yield item
            done += 1
            if sink is not None:
                sink(ProgressEvent(key, description, done, total))
    finally:
        if sink is not None:
            sink(ProgressEvent(key, description, done, total, finished=True))
        log.info("%s: %d step(s) in %.1f s", description, done, time.perf_counter() - t0)


def progress_callback(description: str) -> Callable[[int, int, str], None]:
    """A ``progress(done, total, label)`` callback (the form the analysis sweeps call) reporting to the sink
    installed now, as one step whose description follows ``label``; it finishes when ``done`` reaches ``total``."""
    sink, key = _SINK.get(), next(_NEXT_KEY)

    def update(done: int, total: int, label: str) -> None:
        if sink is not None:
            sink(ProgressEvent(key, f"{description}: {label}", done, total, finished=done >= total))
    return update
