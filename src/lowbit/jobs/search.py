"""The mixed-precision search job: find a recipe first, then the quantize job runs with it as usual.

* fallback (``min_agreement`` or ``max_drop``): the fewest layers kept float so the target holds;
* bit allocation (``size_budget_mb`` or ``avg_bits``): weight bits {2, 4, 8} and activation bits
  (``act_bits``) under the budget.

Candidates are exported and run on ONNX Runtime (the engine the report measures) on the evaluation inputs,
so the target is checked on the same samples and the same engine as the report's figures. ``max_drop`` is in
percentage points: ``0.5`` allows ``metric_fp32 − metric ≤ 0.005`` for a metric that is a fraction.

The found recipe goes to ``DIR/recipe.yaml`` as usual; :attr:`SearchOutcome.on_report` adds a ``search``
section to ``report.json`` (with a ``report_check`` of the target against the report's own figures) and writes
the plot into ``DIR/search.html``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.device import place
from lowbit.analysis.metrics import accuracy
from lowbit.data import Data, rank_and_world
from lowbit.outdir import check_output_dir
from lowbit.report.evaluate import EvalSet
from lowbit.search import allocate_bits, fallback, search_html
from lowbit.search.scoring import Score, Target, onnxruntime_runner
from lowbit.transforms.recipe import Recipe

FALLBACK_FLAGS = ("min_agreement", "max_drop")
ALLOCATION_FLAGS = ("size_budget_mb", "avg_bits")


@dataclass(frozen=True)
class SearchRequest:
    """What to search for (the ``lowbit quantize`` search options); nothing set: no search."""

    min_agreement: float | None = None
    max_drop: float | None = None  # percentage points
    size_budget_mb: float | None = None
    avg_bits: float | None = None
    act_bits: tuple[int, ...] = (8,)
    budget_seconds: float = 300.0

    @property
    def requested(self) -> bool:
        return any(getattr(self, k) is not None for k in FALLBACK_FLAGS + ALLOCATION_FLAGS)

    @property
    def is_fallback(self) -> bool:
        return any(getattr(self, k) is not None for k in FALLBACK_FLAGS)

    def check(self) -> None:
        fb = [k for k in FALLBACK_FLAGS if getattr(self, k) is not None]
        al = [k for k in ALLOCATION_FLAGS if getattr(self, k) is not None]
        if fb and al:
            raise ValueError(f"--{fb[0].replace('_', '-')} cannot be combined with --{al[0].replace('_', '-')}: "
                             "run the fallback or the bit allocation, not both")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ValueError(f"--max-drop must be >= 0 percentage points, got {self.max_drop}")
        if not self.budget_seconds > 0:
            raise ValueError(f"--search-budget-seconds must be > 0, got {self.budget_seconds}")


@dataclass
class SearchOutcome:
    """The recipe to quantize with, the search's result, a one-line summary and the report hook."""

    recipe: Recipe
    result: object
    message: str
    on_report: Callable[[dict, Path], None]


def _metric(ev: EvalSet) -> dict:
    if ev.eval_fn is not None:
        return {"eval_fn": ev.eval_fn}
    if ev.labels is not None:
        labels = ev.labels
        return {"metric_fn": lambda ref, out: accuracy(out, labels)}
    return {}


def run_search(request: SearchRequest, model: nn.Module, example_input: torch.Tensor, calib: Data, ev: EvalSet,
               recipe: Recipe, title: str, out_dir: str | Path, force: bool = False, threads: int = 2,
               progress: Callable[[str], None] | None = None,
               device: str | torch.device | None = None) -> SearchOutcome:
    """Run the requested search (``request.requested`` must be true) before quantizing into ``out_dir``.

    Args:
        title: the title of ``search.html``.
        progress: ``progress(line)`` for the fallback's steps.
        device: where candidates are calibrated and simulated (``cpu``, ``cuda``, ``auto``; None: ``model``'s
            device); they are exported and measured on ONNX Runtime from CPU copies.
    """
    request.check()
    recipe = recipe.for_machine()
    if rank_and_world()[1] > 1:
        raise ValueError("the mixed precision search runs in one process; drop --nproc (each process would search "
                         "on its own, and time budgets could make them pick different recipes)")
    check_output_dir(Path(out_dir), force)  # fail before a long search, not after it
    model = place(model, device)
    runner = onnxruntime_runner(example_input, recipe.target, threads)
    common = dict(example_input=example_input, runner=runner, budget_seconds=request.budget_seconds, **_metric(ev))
    if request.is_fallback:
        max_drop = None if request.max_drop is None else request.max_drop / 100.0
        res = fallback(model, calib, ev.inputs, recipe, min_agreement=request.min_agreement, max_drop=max_drop,
                       progress=progress, **common)
        message = f"search: {res.message} [{res.seconds:.0f} s on {res.engine}]"
    else:
        res = allocate_bits(model, calib, ev.inputs, recipe, size_budget_mb=request.size_budget_mb,
                            avg_bits=request.avg_bits, act_bits=request.act_bits, **common)
        message = (f"search: bits chosen for {len(res.bits)} layers, {res.predicted_size_mb:.4g} MB predicted, "
                   f"{res.avg_bits:.2f} mean weight bits → metric {res.metric:.4f} [{res.seconds:.0f} s]")
    section = res.to_json()
    section.update(metric_name=ev.metric_name, max_drop_points=request.max_drop,
                   search_data="the evaluation inputs of --data (the samples the report is measured on)")

    def hook(report: dict, staging: Path) -> None:
        if section["kind"] == "fallback":
            section["report_check"] = _report_check(res.target, report)
        report["search"] = section
        (staging / "search.html").write_text(search_html(section, title))

    return SearchOutcome(res.recipe, res, message, hook)


def _report_check(target: Target, report: dict) -> dict:
    """The target checked against the report's own ONNX Runtime figures."""
    score = Score(float(report["metric_int8"]), float(report["top1_agreement"]), float("nan"))
    return {"agreement": score.agreement, "metric_drop": float(report["metric_fp32"]) - score.metric,
            "met": target.met(score, float(report["metric_fp32"]))}
