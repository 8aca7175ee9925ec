"""Prometheus metrics of the deployment guard, on a registry of their own (one per server).

| metric | type | labels | meaning |
|---|---|---|---|
| ``lowbit_requests_total`` | counter | ``model`` | predictions answered, by the precision that answered |
| ``lowbit_rejected_requests_total`` | counter | ``reason`` | requests refused with a 4xx (never reach a model) |
| ``lowbit_request_errors_total`` | counter | | predictions that failed inside the server (500) |
| ``lowbit_request_latency_seconds`` | histogram | ``model`` | arrival → response ready, answered predictions |
| ``lowbit_shadow_samples_total`` | counter | ``verdict`` | shadowed requests judged ``good`` / ``bad`` |
| ``lowbit_shadow_dropped_total`` | counter | ``reason`` | samples not compared (``queue_full``, ``stale``, ``error``) |
| ``lowbit_shadow_kl_nats`` | histogram | | KL(FP32 ‖ INT8) of softmax outputs per shadowed request |
| ``lowbit_shadow_sqnr_db`` | histogram | | output SQNR per shadowed request |
| ``lowbit_shadow_rows_total`` / ``lowbit_shadow_top1_mismatch_rows_total`` | counter | | rows compared / with a different argmax |
| ``lowbit_shadow_last`` | gauge | ``measure`` | the latest shadowed request's ``kl``, ``sqnr_db``, ``top1_mismatch`` |
| ``lowbit_quantization_error`` | gauge | ``layer`` | relative error ``sqrt(Σ(x-x̂)²/Σx²)`` of each quantized activation, latest shadowed request |
| ``lowbit_layer_sqnr_db`` | gauge | ``layer`` | the same as SQNR in dB |
| ``lowbit_fuse_open`` | gauge | | 1 while serving falls back to FP32 |
| ``lowbit_fuse_consecutive_bad`` / ``_good`` | gauge | | the current runs of the fuse |
| ``lowbit_fuse_trips_total`` / ``lowbit_fuse_recoveries_total`` | counter | | INT8 → FP32 / FP32 → INT8 switches |
| ``lowbit_model_info`` | gauge | ``version`` | 1 for the model version being served |
| ``lowbit_reservoir_rows`` | gauge | | input rows held for re-calibration |
| ``lowbit_recalibrations_total`` | counter | ``result`` | ``accepted`` (hot-swapped), ``rejected``, ``failed`` |
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lowbit.serve.fuse import FuseState
from lowbit.serve.shadow import Divergence

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
KL_BUCKETS = (1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SQNR_BUCKETS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 50.0, 60.0)


class ServeMetrics:
    """Every metric of one server (see the module table)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("lowbit_requests", "Predictions answered", ["model"], registry=r)
        self.rejected = Counter("lowbit_rejected_requests", "Requests refused with a 4xx", ["reason"], registry=r)
        self.errors = Counter("lowbit_request_errors", "Predictions that failed with a 500", registry=r)
        self.latency = Histogram("lowbit_request_latency_seconds", "Prediction latency, arrival to response",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_samples = Counter("lowbit_shadow_samples", "Shadowed requests by verdict", ["verdict"], registry=r)
        self.shadow_dropped = Counter("lowbit_shadow_dropped", "Sampled requests not compared", ["reason"], registry=r)
        self.shadow_kl = Histogram("lowbit_shadow_kl_nats", "KL(FP32 || INT8) of softmax outputs per shadowed request",
                                   buckets=KL_BUCKETS, registry=r)
        self.shadow_sqnr = Histogram("lowbit_shadow_sqnr_db", "Output SQNR (dB) per shadowed request",
                                     buckets=SQNR_BUCKETS, registry=r)
        self.shadow_rows = Counter("lowbit_shadow_rows", "Rows compared by the shadow", registry=r)
        self.shadow_mismatch = Counter("lowbit_shadow_top1_mismatch_rows", "Shadowed rows whose argmax differs",
                                       registry=r)
        self.shadow_last = Gauge("lowbit_shadow_last", "Latest shadowed request's divergence", ["measure"], registry=r)
        self.layer_error = Gauge("lowbit_quantization_error", "Relative error of each quantized activation "
                                 "(latest shadowed request)", ["layer"], registry=r)
        self.layer_sqnr = Gauge("lowbit_layer_sqnr_db", "SQNR (dB) of each quantized activation "
                                "(latest shadowed request)", ["layer"], registry=r)
        self.fuse_open = Gauge("lowbit_fuse_open", "1 while serving falls back to FP32", registry=r)
        self.fuse_bad = Gauge("lowbit_fuse_consecutive_bad", "Current run of bad shadowed requests", registry=r)
        self.fuse_good = Gauge("lowbit_fuse_consecutive_good", "Current run of good shadowed requests (fuse open)",
                               registry=r)
        self.fuse_trips = Counter("lowbit_fuse_trips", "Switches INT8 -> FP32", registry=r)
        self.fuse_recoveries = Counter("lowbit_fuse_recoveries", "Switches FP32 -> INT8", registry=r)
        self.model_info = Gauge("lowbit_model_info", "1 for the model version being served", ["version"], registry=r)
        self.reservoir_rows = Gauge("lowbit_reservoir_rows", "Input rows held for re-calibration", registry=r)
        self.recalibrations = Counter("lowbit_recalibrations", "Re-calibrations by result", ["result"], registry=r)
        self._verdict = {v: self.shadow_samples.labels(verdict=v) for v in ("good", "bad")}
        self._last = {m: self.shadow_last.labels(measure=m) for m in ("kl", "sqnr_db", "top1_mismatch")}
        self._layers: dict[str, tuple] = {}  # label -> (error gauge child, sqnr gauge child): labels() is slow
        for reason in ("queue_full", "stale", "error"):
            self.shadow_dropped.labels(reason=reason)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def set_version(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version=version).set(1)

    def observe_shadow(self, div: Divergence, bad: bool, layers: dict[str, tuple[float, float]]) -> None:
        """Record one compared request: its divergence, verdict and per-layer errors."""
        self._verdict["bad" if bad else "good"].inc()
        self.shadow_kl.observe(div.kl)
        self.shadow_sqnr.observe(div.sqnr_db)
        self.shadow_rows.inc(div.rows)
        self.shadow_mismatch.inc(round(div.top1_mismatch * div.rows) if div.top1_mismatch == div.top1_mismatch else 0)
        for name, value in (("kl", div.kl), ("sqnr_db", div.sqnr_db), ("top1_mismatch", div.top1_mismatch)):
            self._last[name].set(value)
        for layer, (rel, sqnr) in layers.items():
            gauges = self._layers.get(layer)
            if gauges is None:
                gauges = self._layers[layer] = (self.layer_error.labels(layer=layer), self.layer_sqnr.labels(layer=layer))
            gauges[0].set(rel)
            gauges[1].set(sqnr)

    def observe_fuse(self, before: FuseState, after: FuseState) -> None:
        """Mirror the fuse after one verdict (counting a trip or recovery it caused)."""
        self.fuse_open.set(1 if after.is_open else 0)
        self.fuse_bad.set(after.consecutive_bad)
        self.fuse_good.set(after.consecutive_good)
        self.fuse_trips.inc(after.trips - before.trips)
        self.fuse_recoveries.inc(after.recoveries - before.recoveries)

    def clear_layers(self) -> None:
        """Forget the per-layer gauges (a new model may have other layers)."""
        self._layers = {}
        self.layer_error.clear()
        self.layer_sqnr.clear()
