"""A bounded store of the most recent input rows the server answered, for re-calibration on field data.

It keeps the last ``capacity`` rows (a ring: the oldest row goes when a new one comes), so its memory is
bounded by ``capacity · row size`` whatever the traffic, and a re-calibration sees the inputs of now, not of
the day the model was calibrated. Rows are copied, so a kept row never pins the rest of its request's batch.

Rows are deduplicated (by their bytes): a client repeating a few rows cannot fill the reservoir with them, so no
single input weighs more than one row of a re-calibration. The engine offers only rows whose output was finite.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np


class InputReservoir:
    """Thread-safe ring of the last ``capacity`` input rows (each of the model's sample shape)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity {capacity}: must be >= 1")
        self.capacity = capacity
        self._rows: dict[bytes, np.ndarray] = {}  # insertion order = age; key: digest of the row
        self._lock = threading.Lock()
        self._seen = 0
        self.duplicates = 0

    def add(self, batch: np.ndarray) -> None:
        """Add the rows of ``batch`` ``[N, ...]`` (a row already held is kept once, as the newest); the oldest go."""
        rows = [np.array(row, dtype=np.float32) for row in batch[-self.capacity:]]
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        with self._lock:
            self._seen += int(batch.shape[0])
            for key, row in zip(keys, rows):
                if key in self._rows:  # held already: it becomes the newest row, still one row
                    self.duplicates += 1
                    del self._rows[key]
                self._rows[key] = row
                if len(self._rows) > self.capacity:
                    del self._rows[next(iter(self._rows))]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def seen(self) -> int:
        """Rows offered since the start (kept or not)."""
        return self._seen

    def snapshot(self) -> np.ndarray:
        """The rows held now, oldest first, stacked into one new array ``[len, ...]``."""
        with self._lock:
            rows = list(self._rows.values())
        if not rows:
            raise ValueError("the input reservoir is empty: no request has been answered yet")
        return np.stack(rows)
