"""``lowbit quantize`` mixed-precision options: search a recipe first, then quantize with it as usual.

    --min-agreement 0.99 | --max-drop 0.5      fallback: fewest layers kept float so the target holds
    --size-budget-mb 2.5 | --avg-bits 4.5      bit allocation: weight bits {2, 4, 8} and activation bits
                                               (--act-bits, default 8) under the budget
    --search-budget-seconds 300                time for the search

Candidates are exported and run on ONNX Runtime (the engine the report measures) on the evaluation inputs
of ``--data``, so the target is checked on the same samples and the same engine as the report's figures.
``--max-drop`` is in percentage points: ``0.5`` allows ``metric_fp32 − metric ≤ 0.005`` for a metric that
is a fraction (accuracy, agreement, or an ``--eval`` function returning one).

The found recipe goes to ``DIR/recipe.yaml`` as usual, a ``search`` section into ``report.json`` (with a
``report_check`` of the target against the report's own figures) and the plot into ``DIR/search.html``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from lowbit.analysis.metrics import accuracy
from lowbit.export.onnx_export import export_onnx
from lowbit.export.runtime import make_session
from lowbit.nn import TensorQuantizer
from lowbit.pipeline import check_output_dir
from lowbit.report.evaluate import EvalSet, batched_predict
from lowbit.search import allocate_bits, fallback, search_html
from lowbit.search.evaluate import Runner, Score, Target
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)
console = Console()
FALLBACK_FLAGS = ("min_agreement", "max_drop")
ALLOCATION_FLAGS = ("size_budget_mb", "avg_bits")


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The search options of ``lowbit quantize`` (module doc)."""
    g = p.add_argument_group("mixed precision search (run before quantizing; the found recipe is used)")
    g.add_argument("--min-agreement", type=float, default=None,
                   help="keep the fewest layers in float so top-1 agreement with FP32 is at least this (e.g. 0.99)")
    g.add_argument("--max-drop", type=float, default=None,
                   help="keep the fewest layers in float so the metric drops at most this many percentage points")
    g.add_argument("--size-budget-mb", type=float, default=None,
                   help="choose per-layer weight bits (2/4/8) and activation bits under this model size (MB = 1e6 bytes)")
    g.add_argument("--avg-bits", type=float, default=None,
                   help="choose per-layer bits under this mean weight bit width (weighted by parameter count)")
    g.add_argument("--act-bits", default="8",
                   help="activation bit widths the allocation may use, e.g. 8,16 (default 8: 16-bit Q/DQ does not "
                        "export to ONNX yet)")
    g.add_argument("--search-budget-seconds", type=float, default=300.0, help="time for the search (default 300)")


def search_requested(args: argparse.Namespace) -> bool:
    """True when any search option was given."""
    return any(getattr(args, k, None) is not None for k in FALLBACK_FLAGS + ALLOCATION_FLAGS)


def onnxruntime_runner(example_input: torch.Tensor, target: str = "onnxruntime", threads: int = 2,
                       batch_size: int = 32) -> Runner:
    """A search runner that exports each candidate (FP32 with ``float_model``) and runs it on ONNX Runtime."""

    def run(model: nn.Module, float_model: bool = False):
        with tempfile.TemporaryDirectory(prefix="lowbit-search-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            try:
                export_onnx(model, example_input, path, target=target, float_model=float_model, check_parity=False)
            except Exception as exc:  # noqa: BLE001 — one line naming what could not be exported
                wide = sorted({q.spec.bits for q in model.modules()
                               if isinstance(q, TensorQuantizer) and q.spec is not None and q.spec.bits > 8})
                hint = f" ({'/'.join(map(str, wide))}-bit activations: try --act-bits 8)" if wide else ""
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise RuntimeError(f"a search candidate does not export to ONNX{hint}: {type(exc).__name__}: {first}") from exc
            session = make_session(path, threads)
        return batched_predict(session, batch_size)

    run.engine = "onnxruntime"
    return run


def _act_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--act-bits {text!r}: expected integers like 8,16") from None
    if not bits:
        raise ValueError(f"--act-bits {text!r}: give at least one bit width")
    return bits


def _check(args: argparse.Namespace) -> None:
    fb = [k for k in FALLBACK_FLAGS if getattr(args, k, None) is not None]
    al = [k for k in ALLOCATION_FLAGS if getattr(args, k, None) is not None]
    if fb and al:
        raise ValueError(f"--{fb[0].replace('_', '-')} cannot be combined with --{al[0].replace('_', '-')}: "
                         "run the fallback or the bit allocation, not both")
    if getattr(args, "max_drop", None) is not None and not args.max_drop >= 0:
        raise ValueError(f"--max-drop must be >= 0 percentage points, got {args.max_drop}")
    if not getattr(args, "search_budget_seconds", 1.0) > 0:
        raise ValueError(f"--search-budget-seconds must be > 0, got {args.search_budget_seconds}")


def _metric(ev: EvalSet) -> dict:
    if ev.eval_fn is not None:
        return {"eval_fn": ev.eval_fn}
    if ev.labels is not None:
        labels = ev.labels
        return {"metric_fn": lambda ref, out: accuracy(out, labels)}
    return {}


def run_search(args: argparse.Namespace, model: nn.Module, example_input: torch.Tensor, calib, ev: EvalSet,
               recipe: Recipe, title: str) -> tuple[Recipe, Callable[[dict, Path], None] | None]:
    """Run the requested search; returns the recipe to quantize with and a report hook (None: no search).

    The hook adds the ``search`` section to the report and writes ``search.html`` into the staging folder.
    """
    if not search_requested(args):
        return recipe, None
    _check(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError("the mixed precision search runs in one process; drop --nproc (each process would search "
                         "on its own, and time budgets could make them pick different recipes)")
    check_output_dir(Path(args.out), args.force)  # fail before a long search, not after it
    runner = onnxruntime_runner(example_input, recipe.target, getattr(args, "threads", 2))
    common = dict(example_input=example_input, runner=runner, budget_seconds=args.search_budget_seconds, **_metric(ev))
    with console.status("mixed precision search...") as status:
        if any(getattr(args, k, None) is not None for k in FALLBACK_FLAGS):
            max_drop = None if args.max_drop is None else args.max_drop / 100.0
            res = fallback(model, calib, ev.inputs, recipe, min_agreement=args.min_agreement, max_drop=max_drop,
                           progress=lambda line: status.update(f"fallback search: {line}"), **common)
            console.print(f"search: {res.message} [{res.seconds:.0f} s on {res.engine}]")
        else:
            res = allocate_bits(model, calib, ev.inputs, recipe, size_budget_mb=args.size_budget_mb,
                                avg_bits=args.avg_bits, act_bits=_act_bits(args.act_bits), **common)
            console.print(f"search: bits chosen for {len(res.bits)} layers, {res.predicted_size_mb:.4g} MB predicted, "
                          f"{res.avg_bits:.2f} mean weight bits → metric {res.metric:.4f} [{res.seconds:.0f} s]")
    section = res.to_json()
    section.update(metric_name=ev.metric_name, max_drop_points=getattr(args, "max_drop", None),
                   search_data="the evaluation inputs of --data (the samples the report is measured on)")

    def hook(report: dict, staging: Path) -> None:
        if section["kind"] == "fallback":
            section["report_check"] = _report_check(res.target, report)
        report["search"] = section
        (staging / "search.html").write_text(search_html(section, title))

    return res.recipe, hook


def _report_check(target: Target, report: dict) -> dict:
    """The target checked against the report's own ONNX Runtime figures."""
    score = Score(float(report["metric_int8"]), float(report["top1_agreement"]), float("nan"))
    return {"agreement": score.agreement, "metric_drop": float(report["metric_fp32"]) - score.metric,
            "met": target.met(score, float(report["metric_fp32"]))}
