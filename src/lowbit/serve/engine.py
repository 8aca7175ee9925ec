"""The serving engine: answer a batch with the precision the fuse allows, shadow a sample of requests.

Per request (called from the server's worker threads):

1. read the current :class:`ModelSet` and the fuse once (a swap or a trip later does not touch this request);
2. draw the shadow sample with probability ``shadow_rate``;
3. serving INT8 and sampled: run the INT8 *debug* session, whose first output is bit-identical to the plain
   session's and whose extra outputs are the quantized codes the per-layer error needs; otherwise the plain
   session of the serving precision;
4. hand a sampled request to the single shadow thread (never waited for; when ``shadow_queue`` samples are
   already waiting it is dropped and counted), which runs the FP32 reference session (and the INT8 debug
   session when FP32 served), computes the divergence, reads the per-layer errors, updates the metrics and
   feeds the fuse;
5. keep the input rows whose output is finite in the reservoir (deduplicated).
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lowbit.serve.config import ServeConfig
from lowbit.serve.fuse import Fuse
from lowbit.serve.metrics import ServeMetrics
from lowbit.serve.models import ModelSet
from lowbit.serve.reservoir import InputReservoir
from lowbit.serve.shadow import output_divergence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One answered request."""

    output: np.ndarray
    precision: str
    version: str
    shadowed: bool


class Engine:
    """Models, fuse, shadow, reservoir and metrics of one server (thread-safe)."""

    def __init__(self, config: ServeConfig, models: ModelSet, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self._models = models
        self.fuse = Fuse(config.max_bad, config.recover_good)
        self.reservoir = InputReservoir(config.reservoir_size)
        self.metrics = metrics or ServeMetrics()
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # sampler, shadow counters, swap vs verdict
        self._shadow = ThreadPoolExecutor(1, thread_name_prefix="lowbit-shadow")
        self._slots = threading.BoundedSemaphore(config.shadow_queue)
        self._counts = {"sampled": 0, "compared": 0, "dropped": 0, "pending": 0}
        self.metrics.set_version(models.version)
        self.metrics.fuse_open.set(0)

    @property
    def models(self) -> ModelSet:
        return self._models

    def serving_precision(self) -> str:
        """``fp32`` when configured so or while the fuse is open, else ``int8``."""
        return "fp32" if self.config.precision == "fp32" or self.fuse.is_open else "int8"

    def _sampled(self) -> bool:
        rate = self.config.shadow_rate
        if rate <= 0.0:
            return False
        with self._lock:
            return rate >= 1.0 or self._rng.random() < rate

    def predict(self, x: np.ndarray) -> Prediction:
        """Answer ``x`` ``[N, *sample_shape]`` float32 (already validated)."""
        models = self._models
        precision = self.serving_precision()
        sampled = self._sampled()
        if sampled and precision == "int8":
            outputs, codes = models.int8_debug.run(x)
            out = outputs[0]
            self._submit(models, x, out, codes)
        else:
            out = models.run(precision, x)
            if sampled:
                self._submit(models, x, None, None)
        finite = np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1) if out.shape[:1] == x.shape[:1] else None
        if finite is not None and finite.any():  # rows whose output is NaN / infinite never enter the reservoir
            self.reservoir.add(x if finite.all() else x[finite])
        self.metrics.reservoir_rows.set(len(self.reservoir))
        return Prediction(out, precision, models.version, sampled)

    def _count(self, **delta: int) -> None:
        with self._lock:
            for key, d in delta.items():
                self._counts[key] += d

    def _submit(self, models: ModelSet, x: np.ndarray, int8_out: np.ndarray | None, codes: dict | None) -> None:
        self._count(sampled=1)
        if not self._slots.acquire(blocking=False):
            self.metrics.shadow_dropped.labels(reason="queue_full").inc()
            self._count(dropped=1)
            return
        self._count(pending=1)
        try:
            self._shadow.submit(self._compare, models, x, int8_out, codes)
        except RuntimeError:  # shutting down
            self._slots.release()
            self._count(pending=-1, dropped=1)

    def _compare(self, models: ModelSet, x: np.ndarray, int8_out: np.ndarray | None, codes: dict | None) -> None:
        """Shadow thread: compare INT8 with FP32 on ``x``, record metrics, feed the fuse."""
        try:
            if int8_out is None:
                outputs, codes = models.int8_debug.run(x)
                int8_out = outputs[0]
            fp_out, layers = models.reference.run(x, codes)
            div = output_divergence(fp_out, int8_out)
            bad = div.is_bad(self.config.threshold)
            with self._lock:  # a swap in between would make this verdict about a model no longer served
                stale = models is not self._models
                if not stale:
                    before = self.fuse.state()
                    after = self.fuse.record(bad)
            if stale:
                self.metrics.shadow_dropped.labels(reason="stale").inc()
                self._count(dropped=1)
                return
            self.metrics.observe_shadow(div, bad, layers)
            self.metrics.observe_fuse(before, after)
            self._count(compared=1)
            if after.trips > before.trips:
                log.warning("fuse tripped after %d bad samples (last: KL %.4g, SQNR %.1f dB): serving FP32",
                            self.fuse.max_bad, div.kl, div.sqnr_db)
            elif after.recoveries > before.recoveries:
                log.warning("INT8 recovered for %d samples: serving INT8 again", self.fuse.recover_good)
        except Exception:  # noqa: BLE001 — the shadow must never take the server down
            log.exception("shadow comparison failed")
            self.metrics.shadow_dropped.labels(reason="error").inc()
            self._count(dropped=1)
        finally:
            self._count(pending=-1)
            self._slots.release()

    def swap(self, models: ModelSet) -> None:
        """Serve ``models`` from the next request on; close the fuse (the new INT8 model starts afresh)."""
        with self._lock:
            self._models = models
            before = self.fuse.state()
            after = self.fuse.reset()
        self.metrics.set_version(models.version)
        self.metrics.clear_layers()
        self.metrics.observe_fuse(before, after)
        log.warning("now serving model version %s (%s)", models.version, models.folder)

    def shadow_counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def health(self) -> dict:
        """What ``GET /health`` returns."""
        models = self._models
        return {
            "status": "ok",
            "serving": self.serving_precision(),
            "precision": self.config.precision,
            "version": models.version,
            "fuse": self.fuse.state().to_dict(),
            "shadow": {"rate": self.config.shadow_rate, **self.shadow_counts()},
            "threshold": self.config.threshold.to_dict(),
            "reservoir": {"rows": len(self.reservoir), "capacity": self.reservoir.capacity,
                          "seen": self.reservoir.seen, "duplicates": self.reservoir.duplicates},
            "input": {"name": models.input_name, "sample_shape": list(models.sample_shape), "dtype": "float32"},
            "max_batch": self.config.max_batch,
        }

    def close(self) -> None:
        """Stop the shadow thread after the comparison it is running; queued ones are dropped."""
        self._shadow.shutdown(wait=True, cancel_futures=True)
