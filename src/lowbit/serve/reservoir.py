"""A bounded store of the most recent input rows the server answered, for re-calibration on field data.

It keeps the last ``capacity`` rows (a ring: the oldest row goes when a new one comes), so its memory is
bounded by ``capacity · row size`` whatever the traffic, and a re-calibration sees the inputs of now, not of
the day the model was calibrated. Rows are copied, so a kept row never pins the rest of its request's batch.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np


class InputReservoir:
    """Thread-safe ring of the last ``capacity`` input rows (each of the model's sample shape)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity {capacity}: must be >= 1")
        self.capacity = capacity
        self._rows: deque[np.ndarray] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seen = 0

    def add(self, batch: np.ndarray) -> None:
        """Add every row of ``batch`` ``[N, ...]``; only the last ``capacity`` rows of the stream stay."""
        rows = [np.array(row, dtype=np.float32) for row in batch[-self.capacity:]]
        with self._lock:
            self._rows.extend(rows)
            self._seen += int(batch.shape[0])

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seen(self) -> int:
        """Rows offered since the start (kept or not)."""
        return self._seen

    def snapshot(self) -> np.ndarray:
        """The rows held now, oldest first, stacked into one new array ``[len, ...]``."""
        with self._lock:
            rows = list(self._rows)
        if not rows:
            raise ValueError("the input reservoir is empty: no request has been answered yet")
        return np.stack(rows)
