"""``lowbit analyze``: parse the options into :func:`lowbit.jobs.analyze.analyze_to_dir`, run it, print the result.

    lowbit analyze --model M --data D --recipe R --out DIR [--calibrator C] [--budget-seconds S] [--force]
                   [--n-calib N] [--n-eval N] [--input-shape ...] [--engine {simulation,onnxruntime}]

The job writes ``DIR/analysis.json`` and ``DIR/analysis.html`` (and ``DIR/analysis_onnxruntime.json`` with
``--engine onnxruntime``); this prints the five worst layers (by cumulative SQNR) with their fixes, and with
``--engine onnxruntime`` the five worst tensors as ONNX Runtime computes them.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowbit.progress import progress_callback
from lowbit.analysis.onnx_tensors import worst_tensors
from lowbit.cli.sources import add_source_args, load_data_source, load_model_source
from lowbit.jobs.analyze import analyze_to_dir
from lowbit.outdir import check_output_dir
from lowbit.report.html import as_float
from lowbit.transforms.recipe import load_recipe

log = logging.getLogger(__name__)
console = Console()
N_WORST = 5


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    """The ``analyze`` subcommand's options."""
    add_source_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (analysis.json, analysis.html)")
    p.add_argument("--budget-seconds", type=float, default=60.0, help="time for the sensitivity sweeps (default 60)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--n-calib", type=int, default=None, help="number of calibration (= analysis) samples")
    p.add_argument("--n-eval", type=int, default=None, help="number of evaluation samples loaded from --data")
    p.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--batch-size", type=int, default=8, help="analysis batch size (memory grows with it)")
    p.add_argument("--engine", default="simulation", choices=("simulation", "onnxruntime"),
                   help="simulation (default), or also the exported INT8 model on ONNX Runtime "
                        "(writes analysis_onnxruntime.json)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _sort_key(row: dict) -> float:
    """Worst first: NaN before everything, then ascending cumulative SQNR, inf last."""
    v = as_float(row.get("sqnr_db_cumulative"))
    return -math.inf if v is None or math.isnan(v) else v


def worst_rows(rows: list[dict], n: int = N_WORST) -> list[dict]:
    """The ``n`` rows with the lowest cumulative SQNR (missing / NaN counted as worst)."""
    return sorted(rows, key=_sort_key)[:n]


def _cell(v) -> str:
    num = as_float(v)
    if isinstance(v, (float, int)) and num is not None and math.isfinite(num):
        return f"{num:.2f}" if abs(num) >= 0.01 or num == 0 else f"{num:.2e}"
    return "" if v is None else str(v)


def print_worst(analysis: dict, out_dir: Path) -> None:
    """The terminal table: five worst layers by cumulative SQNR, then their suggested fixes (unwrapped YAML)."""
    table = Table(title=f"lowbit analyze: {N_WORST} worst layers by cumulative SQNR (dB, higher is better)")
    worst = worst_rows(analysis.get("rows") or [])
    name_width = min(40, max([len(str(r.get("layer"))) for r in worst] + [5]))
    table.add_column("layer", no_wrap=True, min_width=name_width, overflow="fold")
    for col in ("SQNR iso dB", "SQNR cum dB", "metric drop", "flags", "verdict"):
        table.add_column(col, overflow="fold")
    for r in worst:
        table.add_row(str(r.get("layer")), _cell(r.get("sqnr_db_isolated")), _cell(r.get("sqnr_db_cumulative")),
                      _cell(r.get("sensitivity")), " ".join(r.get("flags") or []), str(r.get("verdict") or "—"))
    console.print(table)
    fixes = [r for r in worst if r.get("fix_rule")]
    if fixes:
        console.print("suggested fixes (recipe rules):")
        for r in fixes:  # plain text, no wrapping or markup: the YAML must stay pasteable
            console.out(f"# {r.get('layer')}: {r.get('verdict')}\n{r['fix_rule']}", highlight=False)
    else:
        console.print("suggested fixes: none (no flagged layer among these)")
    bad = analysis.get("first_nonfinite_layer")
    if bad:
        console.print(f"[bold red]first layer with NaN/Inf output: {escape(str(bad))}[/]")
    console.print(f"wrote {escape(str(out_dir))}/ (analysis.json, analysis.html)", highlight=False)


def print_worst_tensors(engine: dict) -> None:
    """The terminal table of ``--engine onnxruntime``: five worst quantized tensors by SQNR."""
    table = Table(title=f"ONNX Runtime: {N_WORST} worst tensors by SQNR vs FP32 ONNX (dB)")
    rows = worst_tensors([{**r, "sqnr_db": as_float(r["sqnr_db"])} for r in engine["rows"]])
    table.add_column("tensor", no_wrap=True, min_width=min(40, max([len(str(r["tensor"])) for r in rows] + [6])),
                     overflow="fold")
    for col in ("consumer", "SQNR dB", "cosine", "saturation"):
        table.add_column(col, overflow="fold")
    for r in rows:
        cos = as_float(r["cosine"])
        table.add_row(str(r["tensor"]), str(r["consumer"]), _cell(r["sqnr_db"]),
                      "" if cos is None else f"{cos:.5f}", _cell(r["saturation_rate"]))
    console.print(table)
    if engine.get("first_nonfinite_tensor"):
        console.print(f"[bold red]first tensor with NaN/Inf: {escape(str(engine['first_nonfinite_tensor']))}[/]")


def run_analyze(args: argparse.Namespace) -> int:
    """Load model / data / recipe, run the analyze job into ``args.out`` and print the worst layers."""
    check_output_dir(Path(args.out), args.force)
    recipe = load_recipe(args.recipe)
    if args.calibrator:
        recipe = recipe.with_calibrator(args.calibrator)
    if args.budget_seconds < 0:
        raise ValueError(f"--budget-seconds {args.budget_seconds}: must be >= 0")
    src = load_model_source(args.model, args.input_shape)
    calib, evalset = load_data_source(args.data, src, args.n_calib, args.n_eval, args.workers)
    # the sweeps report through lowbit.progress: the command's bars (cli.bars) draw them with the other steps
    result = analyze_to_dir(src.model, src.example_input, calib, evalset.inputs, recipe, args.out, args.force,
                            labels={"model": src.name, "data": args.data, "recipe": args.recipe},
                            title=f"lowbit analysis: {src.name} ({args.recipe})", budget_seconds=args.budget_seconds,
                            batch_size=args.batch_size, engine=getattr(args, "engine", "simulation") == "onnxruntime",
                            progress=progress_callback("sensitivity"), device=args.device)
    print_worst(result.analysis, result.out_dir)
    if result.engine is not None:
        print_worst_tensors(result.engine)
        console.print(f"wrote {escape(str(result.out_dir))}/analysis_onnxruntime.json", highlight=False, soft_wrap=True)
    return 0
