"""``lowbit quantize`` mixed-precision options, parsed into a :class:`lowbit.jobs.search.SearchRequest`.

    --min-agreement 0.99 | --max-drop 0.5      fallback: fewest layers kept float so the target holds
    --size-budget-mb 2.5 | --avg-bits 4.5      bit allocation: weight bits {2, 4, 8} and activation bits
                                               (--act-bits, default 8) under the budget
    --search-budget-seconds 300                time for the search

The search job (:mod:`lowbit.jobs.search`) runs the candidates on ONNX Runtime on the evaluation inputs of
``--data``; the found recipe goes to ``DIR/recipe.yaml``, a ``search`` section into ``report.json`` and the plot
into ``DIR/search.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from lowbit.jobs.search import SearchRequest
from lowbit.jobs.search import run_search as run_search_job
from lowbit.report.evaluate import EvalSet
from lowbit.transforms.recipe import Recipe

console = Console()


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


def _act_bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--act-bits {text!r}: expected integers like 8,16") from None
    if not bits:
        raise ValueError(f"--act-bits {text!r}: give at least one bit width")
    return bits


def search_request(args: argparse.Namespace) -> SearchRequest:
    """The search options of ``args`` (``.requested`` is false when none was given), checked."""
    request = SearchRequest(min_agreement=getattr(args, "min_agreement", None), max_drop=getattr(args, "max_drop", None),
                            size_budget_mb=getattr(args, "size_budget_mb", None), avg_bits=getattr(args, "avg_bits", None),
                            budget_seconds=getattr(args, "search_budget_seconds", 300.0))
    if not request.requested:
        return request
    request.check()
    if request.is_fallback:
        return request
    return dataclasses.replace(request, act_bits=_act_bits(getattr(args, "act_bits", "8")))


def run_search(args: argparse.Namespace, model: nn.Module, example_input: torch.Tensor, calib, ev: EvalSet,
               recipe: Recipe, title: str) -> tuple[Recipe, Callable[[dict, Path], None] | None]:
    """Run the requested search; returns the recipe to quantize with and a report hook (None: no search)."""
    request = search_request(args)
    if not request.requested:
        return recipe, None
    with console.status("mixed precision search...") as status:
        outcome = run_search_job(request, model, example_input, calib, ev, recipe, title, args.out, args.force,
                                 getattr(args, "threads", 2), progress=lambda line: status.update(f"fallback search: {line}"),
                                 device=getattr(args, "device", None))
    console.print(outcome.message)
    return outcome.recipe, outcome.on_report
