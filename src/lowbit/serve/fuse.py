"""The fuse: switch serving to the float model when INT8 quality drops, and back when it recovers.

A two-state machine with hysteresis, fed one verdict (good / bad) per shadowed request:

* ``closed`` (serving INT8): ``max_bad`` consecutive bad verdicts open it (a *trip*); a good verdict resets
  the run of bad ones.
* ``open`` (serving FP32): ``recover_good`` consecutive good verdicts close it again; a bad verdict resets the
  run of good ones.

Requests read the state once when they are dispatched, so a switch never affects a request already running.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

CLOSED, OPEN = "closed", "open"


@dataclass(frozen=True)
class FuseState:
    """A consistent snapshot of the fuse."""

    state: str
    consecutive_bad: int
    consecutive_good: int
    trips: int
    recoveries: int
    max_bad: int
    recover_good: int

    @property
    def is_open(self) -> bool:
        return self.state == OPEN

    def to_dict(self) -> dict:
        return asdict(self)


class Fuse:
    """Thread-safe hysteresis switch between INT8 (closed) and FP32 (open) serving."""

    def __init__(self, max_bad: int, recover_good: int) -> None:
        if max_bad < 1 or recover_good < 1:
            raise ValueError(f"fuse: max_bad ({max_bad}) and recover_good ({recover_good}) must be >= 1")
        self.max_bad, self.recover_good = max_bad, recover_good
        self._lock = threading.Lock()
        self._state = CLOSED
        self._bad = self._good = self._trips = self._recoveries = 0

    @property
    def is_open(self) -> bool:
        """True while serving falls back to the float model (one atomic read, no lock needed)."""
        return self._state == OPEN

    def record(self, bad: bool) -> FuseState:
        """Feed one verdict; returns the state after it (the transition, if any, already applied)."""
        with self._lock:
            if self._state == CLOSED:
                self._bad = self._bad + 1 if bad else 0
                if self._bad >= self.max_bad:
                    self._state, self._bad, self._good = OPEN, 0, 0
                    self._trips += 1
            else:
                self._good = 0 if bad else self._good + 1
                if self._good >= self.recover_good:
                    self._state, self._bad, self._good = CLOSED, 0, 0
                    self._recoveries += 1
            return self._snapshot()

    def reset(self) -> FuseState:
        """Close the fuse and clear both runs (a new INT8 model was swapped in); trip counts are kept."""
        with self._lock:
            self._state, self._bad, self._good = CLOSED, 0, 0
            return self._snapshot()

    def state(self) -> FuseState:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> FuseState:
        return FuseState(self._state, self._bad, self._good, self._trips, self._recoveries, self.max_bad,
                         self.recover_good)
