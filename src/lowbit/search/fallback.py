"""Accuracy-driven fallback: the fewest layers kept in float so that a target holds.

1. **Base**: the recipe as given, scored against FP32 (see :mod:`lowbit.search.scoring`). Met → done.
2. **Ranking**, by one of two scores (``rank_by``):

   - ``"float"`` (AIMET-style "one layer float"): the recipe with only ``l`` in float is scored exactly
     (built and run by the runner); ``score_l = loss_base − loss_l`` (the smooth KL / MSE, not the coarse
     agreement), highest first;
   - ``"quantized"`` (the analysis' sensitivity, one PyTorch pass per layer): only ``l``'s quantizers on,
     every other one off, on the first ``rank_samples`` evaluation inputs; ``score_l`` = that output loss,
     highest first;
   - ``"auto"`` (default): ``"float"`` when one candidate's measured cost times the number of layers fits in
     ``rank_share`` of the time budget, else ``"quantized"``.

   Ranking stops after ``rank_share`` of the budget; unmeasured layers follow in execution order. A
   precomputed ranking (e.g. :func:`ranking_from_analysis`) skips this step.
3. **Prefix search**: the top-``k`` ranked layers are kept float; ``k = 1, 2, 4, …`` until the target holds,
   then bisection between the last failing and the first passing ``k`` (assumes the metric grows with
   ``k``; every candidate is really measured, so a non-monotone model only costs optimality).
4. **Pruning**: float layers, least useful first, are quantized again while the target still holds — in
   groups of a quarter of the set, then halves of that, down to single layers — so no single float layer
   of the result is superfluous (when the pruning finishes within the budget).
5. **Verification**: the chosen recipe is quantized once more with ``lowbit.quantize`` and scored.

Every candidate is an exact quantization of its recipe (:class:`~lowbit.search.candidates.CandidateBuilder`),
not a toggled approximation: a layer kept float by a rule also releases shared input quantizers exactly
as the final recipe will. Float layers stay FP32 (the ONNX Runtime CPU target has no FP16 kernels for
them). When the time budget runs out, the best recipe seen so far is returned with a clear message.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.data import Data
from lowbit.ptq.passes import quantize
from lowbit.search.candidates import CandidateBuilder, layer_pattern, quantized_layers
from lowbit.search.scoring import EvalFn, MetricFn, Runner, Score, Scorer, Target, one_layer_losses, torch_runner
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)


RANK_BY = ("auto", "float", "quantized")


class _OutOfBudget(Exception):
    pass


@dataclass
class FallbackResult:
    """What :func:`fallback` found.

    Attributes:
        recipe: the input recipe plus ``float: true`` rules for ``float_layers``.
        float_layers: layers kept in float, in execution order.
        met: the target holds for ``recipe`` (as verified end to end).
        metric / agreement / loss: the chosen recipe's scores; ``metric_fp32`` the FP32 metric.
        message: one line, e.g. ``target agreement 0.99 not met: best 0.985 with 12 layers float``.
        history: every scored candidate ``{"stage", "float_layers", "n_float", "metric", "agreement",
            "loss", "met", "seconds"}`` in the order scored.
        ranking: ``{"layer", "score", "measured"}`` best first; ``rank_by`` the score used (module doc).
        verified: the end-to-end ``lowbit.quantize`` of ``recipe`` scored exactly as its candidate.
        out_of_budget: the time budget stopped the search early.
    """

    recipe: Recipe
    float_layers: tuple[str, ...]
    met: bool
    metric: float
    metric_fp32: float
    agreement: float
    loss: float
    target: Target
    message: str
    history: list[dict] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    engine: str = "simulation"
    verified: bool = False
    out_of_budget: bool = False
    rank_by: str = "given"

    def to_json(self) -> dict:
        """A JSON-ready dict (the ``search`` section of ``report.json``)."""
        return {
            "kind": "fallback", "target": self.target.to_json(), "met": self.met, "message": self.message,
            "float_layers": list(self.float_layers), "n_float": len(self.float_layers), "metric": self.metric,
            "metric_fp32": self.metric_fp32, "agreement": self.agreement, "loss": self.loss,
            "seconds": self.seconds, "engine": self.engine, "verified": self.verified,
            "out_of_budget": self.out_of_budget, "rank_by": self.rank_by, "ranking": self.ranking, "history": self.history,
        }


def ranking_from_analysis(result) -> list[str]:
    """Layer names of an ``AnalysisResult`` (or its ``to_json()``), most promising to keep float first:
    measured ``recovery`` (metric won back by keeping the layer float) descending, then isolated SQNR
    ascending."""
    rows = result["rows"] if isinstance(result, dict) else result.rows

    def num(v, default):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else default

    return [r["layer"] for r in sorted(rows, key=lambda r: (-num(r.get("recovery"), -math.inf),
                                                             num(r.get("sqnr_db_isolated"), math.inf)))]


def _complete(rows: list[dict], layers: list[str]) -> list[dict]:
    """Measured rows first, then the unmeasured layers in execution order."""
    done = {r["layer"] for r in rows}
    if len(done) < len(layers):
        log.info("ranking stopped by its time share: %d of %d layers measured", len(done), len(layers))
    return rows + [{"layer": n, "score": None, "measured": False} for n in layers if n not in done]


class _Search:
    """State of one fallback run: scored candidates, the ranking, the deadline."""

    def __init__(self, builder: CandidateBuilder, scorer: Scorer, runner: Runner, recipe: Recipe, target: Target,
                 deadline: float, progress: Callable[[str], None] | None) -> None:
        self.builder, self.scorer, self.runner, self.recipe = builder, scorer, runner, recipe
        self.target, self.deadline, self.progress = target, deadline, progress
        self.seen: dict[frozenset, dict] = {}
        self.history: list[dict] = []
        self.t0 = time.perf_counter()

    def recipe_for(self, layers: Sequence[str]) -> Recipe:
        return self.recipe.keep_float(*(layer_pattern(n) for n in layers)) if layers else self.recipe

    def score(self, layers: Sequence[str], stage: str, deadline: float | None = None) -> dict:
        key = frozenset(layers)
        if key in self.seen:
            return self.seen[key]
        if time.perf_counter() > (self.deadline if deadline is None else deadline):
            raise _OutOfBudget
        s = self.scorer.score(self.runner(self.builder.build(self.recipe_for(layers)), False))
        entry = {"stage": stage, "float_layers": list(layers), "n_float": len(layers), "metric": s.metric,
                 "agreement": s.agreement, "loss": s.loss, "met": self.target.met(s, self.scorer.metric_fp32),
                 "seconds": round(time.perf_counter() - self.t0, 3)}
        self.seen[key] = entry
        self.history.append(entry)
        line = (f"{stage}: {len(layers)} layers float → agreement {s.agreement:.4f}, metric {s.metric:.4f}, "
                f"loss {s.loss:.4g} ({'met' if entry['met'] else 'not met'}) [{entry['seconds']:.0f} s]")
        log.info(line)
        if self.progress is not None:
            self.progress(line)
        return entry

    def best(self) -> dict:
        """Met candidates: fewest float layers (then closest to target); else the one closest to the target."""
        met = [e for e in self.history if e["met"]]
        fp32 = self.scorer.metric_fp32
        key = lambda e: self.target.key(Score(e["metric"], e["agreement"], e["loss"]), fp32)  # noqa: E731
        if met:
            return min(met, key=lambda e: (e["n_float"], -key(e)))
        return max(self.history, key=lambda e: (key(e), -e["n_float"]))

    def rank_float(self, layers: list[str], base: dict, rank_deadline: float) -> list[dict]:
        rows = []
        for name in layers:
            try:
                e = self.score([name], "rank", deadline=rank_deadline)
            except _OutOfBudget:
                break
            rows.append({"layer": name, "score": base["loss"] - e["loss"], "measured": True, "_m": e["metric"]})
        rows.sort(key=lambda r: (-r["score"], -r["_m"]))
        return _complete([{k: v for k, v in r.items() if k != "_m"} for r in rows], layers)

    def rank_quantized(self, base_model: nn.Module, layers: list[str], inputs: torch.Tensor,
                       rank_deadline: float) -> list[dict]:
        losses, _ = one_layer_losses(base_model, layers, inputs, self.scorer.loss, deadline=rank_deadline)
        rows = [{"layer": n, "score": v, "measured": True} for n, v in losses.items()]
        rows.sort(key=lambda r: -r["score"])
        return _complete(rows, layers)

    def prefix(self, order: list[str]) -> dict | None:
        """Galloping then bisection over k (module doc); the first passing prefix, or None."""
        lo, k, hi = 0, 1, None
        while hi is None:
            k = min(k, len(order))
            if self.score(order[:k], "prefix")["met"]:
                hi = k
            elif k == len(order):
                return None
            else:
                lo, k = k, 2 * k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.score(order[:mid], "prefix")["met"]:
                hi = mid
            else:
                lo = mid
        return self.seen[frozenset(order[:hi])]

    def prune(self, chosen: dict, order: list[str]) -> None:
        """Quantize float layers again while the target holds: groups of ``len/4`` layers first (least useful
        end of the ranking), halving the group down to single layers."""
        keep = [n for n in order if n in set(chosen["float_layers"])]
        size = max(1, len(keep) // 4)
        while size >= 1:
            end = len(keep)
            while end > 0:
                group = set(keep[max(0, end - size):end])
                trial = [n for n in keep if n not in group]
                if self.score(trial, "prune")["met"]:
                    keep = trial
                end -= size
            size //= 2


def fallback(model: nn.Module, calib_data: Data, eval_inputs: torch.Tensor, recipe: Recipe, *,
             min_agreement: float | None = None, max_drop: float | None = None, metric_fn: MetricFn | None = None,
             eval_fn: EvalFn | None = None, budget_seconds: float = 300.0, example_input: torch.Tensor | None = None,
             runner: Runner | None = None, ranking: Sequence[str] | None = None, rank_by: str = "auto",
             rank_samples: int = 32, loss: str = "kl", rank_share: float = 0.5, prune: bool = True,
             verify: bool = True, progress: Callable[[str], None] | None = None) -> FallbackResult:
    """Keep the fewest layers in float so that the target holds (module doc for the method).

    Args:
        model: the FLOAT model (eval mode; left untouched).
        calib_data: calibration data (as for ``lowbit.quantize``).
        eval_inputs: inputs ``[N, ...]`` the target is checked on.
        recipe: the quantization recipe to start from (its own float rules are kept).
        min_agreement: top-1 agreement with FP32 required (e.g. 0.99).
        max_drop: largest allowed ``metric_fp32 − metric``, in the metric's units (0.005 = half a point).
        metric_fn: ``metric_fn(outputs_fp32, outputs) -> float`` (default: top-1 agreement);
            eval_fn: alternatively ``eval_fn(predict) -> float`` (the CLI's ``--eval``).
        budget_seconds: time for ranking + search (the base, FP32 and final verification always run).
        runner: how candidates run (default :func:`~lowbit.search.scoring.torch_runner`).
        ranking: layer names in the order to try (skips the measured ranking).
        rank_by: ``"auto"``, ``"float"`` or ``"quantized"`` (module doc); rank_samples: evaluation inputs the
            ``"quantized"`` ranking runs on.
        loss: ``"kl"`` or ``"mse"``, the smooth score the ranking uses.
        rank_share: share of the budget the ranking may use.
        prune / verify: steps 4 and 5 of the module doc; progress: called with one line per candidate.

    Returns:
        :class:`FallbackResult`.
    """
    t0 = time.perf_counter()
    target = Target(min_agreement, max_drop)
    if budget_seconds <= 0 or not 0 < rank_share <= 1 or rank_by not in RANK_BY or rank_samples < 1:
        raise ValueError(f"budget_seconds must be > 0, rank_share in (0, 1], rank_by one of {RANK_BY} and "
                         f"rank_samples >= 1; got {budget_seconds}, {rank_share}, {rank_by!r}, {rank_samples}")
    recipe = recipe.for_machine()
    runner = runner or torch_runner()
    example_input = eval_inputs[:1] if example_input is None else example_input
    builder = CandidateBuilder(model, calib_data, example_input)
    base_model = builder.build(recipe)
    scorer = Scorer(eval_inputs, runner(base_model, True), metric_fn, eval_fn, loss)
    search = _Search(builder, scorer, runner, recipe, target, t0 + budget_seconds, progress)
    t_base = time.perf_counter()
    base = search.score([], "base", deadline=math.inf)
    t_base = time.perf_counter() - t_base
    layers = [n for n, _ in quantized_layers(base_model)]
    rows, method, out_of_budget = [], "none", False
    if not base["met"] and layers:
        if ranking is None and rank_by == "auto":
            rank_by = "float" if t_base * len(layers) <= rank_share * budget_seconds else "quantized"
        method = "given" if ranking is not None else rank_by
        try:
            rows = _rank(search, ranking, method, base_model, layers, base, eval_inputs[:rank_samples],
                         t0 + rank_share * budget_seconds)
            order = [r["layer"] for r in rows]
            chosen = search.prefix(order)
            if chosen is not None and prune:
                search.prune(chosen, order)
        except _OutOfBudget:
            out_of_budget = True
            log.warning("fallback: time budget of %.0f s spent; keeping the best recipe found so far", budget_seconds)
    result = _finish(search, search.best(), layers, rows, out_of_budget, verify, model, calib_data, example_input,
                     runner, t0)
    result.rank_by = method
    return result


def _rank(search: _Search, ranking, method: str, base_model: nn.Module, layers: list[str], base: dict,
          inputs: torch.Tensor, deadline: float) -> list[dict]:
    if method == "given":
        return _given(ranking, layers)
    if method == "float":
        return search.rank_float(layers, base, deadline)
    return search.rank_quantized(base_model, layers, inputs, deadline)


def _given(ranking: Sequence[str], layers: list[str]) -> list[dict]:
    unknown = [n for n in ranking if n not in layers]
    if unknown:
        raise ValueError(f"ranking names {unknown[0]!r}, which is not a quantized layer of this model")
    order = list(dict.fromkeys(ranking)) + [n for n in layers if n not in ranking]
    return [{"layer": n, "score": None, "measured": False} for n in order]


def _finish(search: _Search, best: dict, layers: list[str], rows: list[dict], out_of_budget: bool, verify: bool,
            model, calib_data, example_input, runner: Runner, t0: float) -> FallbackResult:
    position = {n: i for i, n in enumerate(layers)}
    chosen = tuple(sorted(best["float_layers"], key=lambda n: position.get(n, len(position))))
    recipe = search.recipe_for(chosen)
    score = Score(best["metric"], best["agreement"], best["loss"])
    verified = False
    if verify:
        again = search.scorer.score(runner(quantize(model, calib_data, recipe, example_input, show_progress=False), False))
        verified = again == score
        if not verified:
            log.warning("fallback: end-to-end quantization scored %s, the search's candidate %s", again, score)
            score = again
    fp32 = search.scorer.metric_fp32
    met = search.target.met(score, fp32)
    n = len(chosen)
    what = f"{n} layer{'s' if n != 1 else ''} float"
    if met:
        message = f"target {search.target.describe()} met with {what} ({search.target.headline(score, fp32)})"
    else:
        message = f"target {search.target.describe()} not met: best {search.target.headline(score, fp32)} with {what}"
        if out_of_budget:
            message += " (time budget spent)"
    log.info("fallback: %s", message)
    return FallbackResult(recipe, chosen, met, score.metric, fp32, score.agreement, score.loss, search.target,
                          message, search.history, rows, time.perf_counter() - t0,
                          getattr(runner, "engine", "custom"), verified, out_of_budget)
