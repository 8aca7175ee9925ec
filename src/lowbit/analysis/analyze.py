"""``analyze``: where does a quantized model lose accuracy, why, and what recipe rule fixes it.

Per batch: one FP32 pass (every quantizer off) that records each site's output and, inside the site's
hook, runs the site alone on its FP32 input with its own quantizers on (isolated errors, three calls:
weight + input, weight only, input only) and feeds the input quantizers' distribution checks; then one
fully quantized pass whose site outputs give the cumulative errors. Only running sums survive a batch.
See :mod:`lowbit.analysis.layerwise`, :mod:`~lowbit.analysis.distribution`,
:mod:`~lowbit.analysis.sensitivity` and :mod:`~lowbit.analysis.verdict` for the formulas.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.progress import progress_steps
from lowbit.analysis.distribution import QuantizerStats, asymmetry, weight_error_split
from lowbit.analysis.layerwise import (ErrorStats, QuantizerSwitch, Site, call_site, find_sites, first_output,
                                       unlink_engine)
from lowbit.analysis.metrics import top1_agreement
from lowbit.analysis.sensitivity import gradient_scores, sweep_sensitivity
from lowbit.analysis.verdict import flags_of, median_isolated, verdict
from lowbit.data import iter_batches, num_batches, run_batch
from lowbit.ptq.passes import quantize

log = logging.getLogger(__name__)

MODES = ("isolated", "weight", "input", "cumulative")
N_HISTOGRAMS = 5


@dataclass
class AnalysisResult:
    """What :func:`analyze` found.

    Attributes:
        rows: one dict per site in execution order (keys: see :func:`_row`).
        histograms: for the ``N_HISTOGRAMS`` sites with the worst cumulative SQNR, their input
            activation histograms ``{"edges", "fp32", "quant", "error", "error_edges"}``.
        first_nonfinite_layer: first site (execution order) whose output had NaN / Inf, else None.
        seconds: wall time of the analysis.
        metric_fp32_vs_quant: ``metric_fn(FP32 outputs, quantized outputs)`` over all the data.
    """

    rows: list[dict] = field(default_factory=list)
    histograms: dict[str, dict] = field(default_factory=dict)
    first_nonfinite_layer: str | None = None
    seconds: float = 0.0
    metric_fp32_vs_quant: float | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict (``analysis.json``): non-finite floats become strings ``"inf"`` / ``"-inf"`` / ``"nan"``."""
        return _jsonable({
            "rows": self.rows, "histograms": self.histograms, "first_nonfinite_layer": self.first_nonfinite_layer,
            "seconds": self.seconds, "metric_fp32_vs_quant": self.metric_fp32_vs_quant,
        })

    def row(self, layer: str) -> dict:
        """The row of ``layer``."""
        return next(r for r in self.rows if r["layer"] == layer)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# The FP32 output of every site is held for one batch (the cumulative error needs it during the quantized
# pass), so memory grows with the batch. On EfficientNet-Lite0 (64 views, 2 cores) batch 8 took 132 s and
# 1.8 GiB peak RSS against 247 s and 4.5 GiB at batch 32.
DEFAULT_BATCH = 8


class _Streamer:
    """Hooks on every site; accumulates the per-site running sums over the batches it is shown."""

    def __init__(self, model: nn.Module, sites: list[Site]) -> None:
        self.model, self.sites = model, sites
        self.switch = QuantizerSwitch(model)
        self.errors = {s.name: {m: ErrorStats() for m in MODES} for s in sites}
        self.qstats: dict[int, QuantizerStats] = {}
        self.order: list[str] = []
        self.nonfinite: dict[str, int] = {}
        self.mode = "off"
        self.refs: dict[tuple[str, int], torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self._seen_q: set[int] = set()
        self.handles = [s.module.register_forward_hook(self._hook(s), with_kwargs=True) for s in sites]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()

    def _hook(self, site: Site):
        def hook(module, args, kwargs, output):
            if self.mode == "off" or not isinstance(output, torch.Tensor):
                return None
            k = self.calls.get(site.name, 0)
            self.calls[site.name] = k + 1
            if not bool(torch.isfinite(output).all()):
                self.nonfinite[site.name] = self.nonfinite.get(site.name, 0) + 1
            if self.mode == "fp32":
                if site.name not in self.order:
                    self.order.append(site.name)
                self.refs[(site.name, k)] = output.detach()
                self._isolated(site, args, kwargs, output.detach())
            elif (site.name, k) in self.refs:
                self.errors[site.name]["cumulative"].update(self.refs[(site.name, k)], output)
            return None
        return hook

    def _isolated(self, site: Site, args: tuple, kwargs: dict, ref: torch.Tensor) -> None:
        mode, self.mode = self.mode, "off"  # the site's own calls below must not re-enter the hook
        try:
            err = self.errors[site.name]
            err["isolated"].update(ref, call_site(site, args, kwargs, self.switch, True, True))
            if site.weight_quantizer is not None:
                err["weight"].update(ref, call_site(site, args, kwargs, self.switch, True, False))
            if any(q is not None for q in site.input_quantizers) or site.own_input_quantizer is not None:
                err["input"].update(ref, call_site(site, args, kwargs, self.switch, False, True))
            self._distribution(site, args)
        finally:
            self.mode = mode

    def _distribution(self, site: Site, args: tuple) -> None:
        qs = site.input_quantizers if site.own_input_quantizer is None else [site.own_input_quantizer]
        for q, x in zip(qs, args):
            if q is None or not isinstance(x, torch.Tensor) or id(q) in self._seen_q:
                continue
            self._seen_q.add(id(q))
            was, q.enabled = q.enabled, True
            try:
                xq = q(x)
            finally:
                q.enabled = was
            self.qstats.setdefault(id(q), QuantizerStats(q)).update(x, xq)

    def run_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """FP32 pass + quantized pass on one batch; returns both model outputs."""
        self.refs, self.calls, self._seen_q = {}, {}, set()
        try:
            self.switch.all(False)
            self.mode = "fp32"
            ref = first_output(run_batch(self.model, batch)).detach().float()
            self.switch.all(True)
            self.mode, self.calls = "quant", {}
            out = first_output(run_batch(self.model, batch)).detach().float()
        finally:
            self.mode, self.refs = "off", {}
            self.switch.restore()
        return ref, out


def _row(site: Site, st: _Streamer) -> dict:
    e = st.errors[site.name]
    row = {"layer": site.name, "type": site.kind, "depthwise": site.depthwise,
           "sqnr_db_isolated": e["isolated"].sqnr_db(), "sqnr_db_cumulative": e["cumulative"].sqnr_db(),
           "cosine_isolated": e["isolated"].cosine(), "cosine_cumulative": e["cumulative"].cosine(),
           "mse_isolated": e["isolated"].mse(), "mse_cumulative": e["cumulative"].mse(),
           "sqnr_db_weight": e["weight"].sqnr_db(), "sqnr_db_input": e["input"].sqnr_db(),
           "mse_weight": e["weight"].mse(), "mse_input": e["input"].mse(),
           "input_quantizers": [q.qname for q in site.input_quantizers if q is not None]}
    qs = site.input_quantizers if site.own_input_quantizer is None else [site.own_input_quantizer]
    stats = [st.qstats[id(q)] for q in qs if q is not None and id(q) in st.qstats]
    if stats:  # worst input (lowest overlap) speaks for the site
        worst = min(stats, key=lambda s: s.summary()["hist_overlap"] if s.n else 1.0)
        row.update(worst.summary())
        row["asymmetry"] = asymmetry(worst.quantizer, worst)
    else:
        row.update({k: None for k in ("kl", "hist_overlap", "clip_mse", "round_mse", "clip_rate",
                                      "saturation_rate", "outlier_rate", "asymmetry")})
    row["nonfinite"] = st.nonfinite.get(site.name, 0)
    if site.weight_quantizer is not None:
        row.update(weight_error_split(site.weight_quantizer, site.module.weight.detach()))
    return row


def _histograms(rows: list[dict], sites: list[Site], st: _Streamer) -> dict[str, dict]:
    key = {r["layer"]: r["sqnr_db_cumulative"] for r in rows if isinstance(r["sqnr_db_cumulative"], float)}
    out = {}
    for name in sorted(key, key=lambda n: key[n])[:N_HISTOGRAMS]:
        site = next(s for s in sites if s.name == name)
        qs = site.input_quantizers if site.own_input_quantizer is None else [site.own_input_quantizer]
        stats = [st.qstats[id(q)] for q in qs if q is not None and id(q) in st.qstats]
        if stats:
            out[name] = stats[0].histograms()
    return out


def _stream(model: nn.Module, sites: list[Site], data, batch_size: int) -> tuple[_Streamer, torch.Tensor, torch.Tensor]:
    st = _Streamer(model, sites)
    refs, outs = [], []
    try:
        with torch.no_grad():
            batches = iter_batches(data, batch_size)
            for batch in progress_steps(batches, "analysing (FP32 and INT8 per layer)", num_batches(data, batch_size)):
                ref, out = st.run_batch(batch)
                refs.append(ref)
                outs.append(out)
    finally:
        st.close()
    if not refs:
        raise ValueError("analysis data is empty: no batch was seen")
    return st, torch.cat(refs), torch.cat(outs)


def analyze_converted(qmodel: nn.Module, data, metric_fn: Callable | None = None, budget_seconds: float = 60.0,
                      batch_size: int = DEFAULT_BATCH, progress: Callable | None = None) -> AnalysisResult:
    """Analyse an already converted model (a copy is analysed; ``qmodel`` is left untouched).

    Args:
        qmodel: a model returned by ``lowbit.quantize`` / ``convert_``.
        data: a Tensor of inputs (cut into ``batch_size`` batches) or a re-iterable of batches.
        metric_fn: ``metric_fn(outputs_fp32, outputs_quant) -> float``, higher is better
            (default: top-1 agreement).
        budget_seconds: time allowed to the sensitivity sweeps; passes beyond it are "not measured".
        progress: optional ``progress(done, total, description)`` callback for the sweeps.
    """
    t0 = time.perf_counter()
    metric_fn = metric_fn or top1_agreement
    model = copy.deepcopy(qmodel).eval()
    if hasattr(qmodel, "lowbit_info"):  # GraphModule.__deepcopy__ drops extra attributes
        model.lowbit_info = qmodel.lowbit_info
    unlink_engine(model)
    sites = find_sites(model)
    st, ref, out = _stream(model, sites, data, batch_size)
    metric_all = float(metric_fn(ref, out))
    rank = {n: i for i, n in enumerate(st.order)}
    sites = sorted(sites, key=lambda s: rank.get(s.name, len(rank)))
    rows = [_row(s, st) for s in sites]
    by_iso = sorted(rows, key=lambda r: r["sqnr_db_isolated"] if r["sqnr_db_isolated"] is not None else math.inf)
    grads = gradient_scores(model, sites, data, batch_size)
    sens = sweep_sensitivity(model, sites, data, ref, metric_all, [r["layer"] for r in by_iso], metric_fn,
                             budget_seconds, batch_size, progress)
    median_db = median_isolated(rows)
    for site, row in zip(sites, rows):
        row.update(grads.get(site.name, {"grad_score": None, "grad_saliency": None, "grad_flag": False}))
        row.update(sens[site.name])
        row["flags"] = flags_of(row, median_db)
        spec = site.weight_quantizer.spec if site.weight_quantizer is not None else None
        row["verdict"], row["fix_rule"] = verdict(row, spec)
    first_bad = next((n for n in st.order if st.nonfinite.get(n)), None)
    if first_bad is not None:
        log.warning("first site producing NaN/Inf: %s", first_bad)
    return AnalysisResult(rows, _histograms(rows, sites, st), first_bad, time.perf_counter() - t0, metric_all)


def analyze(model: nn.Module, data, recipe, example_input: torch.Tensor | None = None,
            metric_fn: Callable | None = None, budget_seconds: float = 60.0, batch_size: int = DEFAULT_BATCH,
            progress: Callable | None = None, device: str | torch.device | None = None) -> AnalysisResult:
    """Quantize a copy of the FLOAT ``model`` with ``recipe`` (calibrated on ``data``) and analyse it.

    Calibration and analysis use the same ``data``; see :func:`analyze_converted` for the arguments.
    ``seconds`` in the result includes the quantization. ``device``: where both run (``cpu``, ``cuda``,
    ``auto``; None: ``model``'s device); batches move there one at a time.
    """
    t0 = time.perf_counter()
    calib = data if isinstance(data, torch.Tensor) else list(iter_batches(data, batch_size))
    qmodel = quantize(model, calib, recipe, example_input, show_progress=False, device=device)
    result = analyze_converted(qmodel, calib, metric_fn, budget_seconds, batch_size, progress)
    result.seconds = time.perf_counter() - t0
    return result
