"""``lowbit analyze``: where does the quantized model lose accuracy, why, and which recipe rule fixes it.

    lowbit analyze --model M --data D --recipe R --out DIR [--calibrator C] [--budget-seconds S] [--force]
                   [--n-calib N] [--n-eval N] [--input-shape ...] [--engine {simulation,onnxruntime}]

Writes ``DIR/analysis.json`` and ``DIR/analysis.html`` (staged beside ``DIR`` and renamed into place, so a
failure leaves nothing partial), and prints the five worst layers (by cumulative SQNR) with their fixes.
The analysis (calibration included) runs on the calibration samples of ``--data``.

``--engine onnxruntime`` also quantizes a copy on the same samples, exports it to FP32 and INT8 ONNX in a
temporary folder, compares every quantized activation as ONNX Runtime computes it with the FP32 export on
the evaluation samples (:func:`lowbit.analysis.onnx_tensors.analyze_onnx`), measures the same tensors in the
PyTorch simulation (:func:`lowbit.analysis.tensorwise.quantized_activation_errors`), writes
``DIR/analysis_onnxruntime.json``, adds an "ONNX Runtime vs simulation" section to ``analysis.html`` and
prints the five worst tensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowbit.analysis import analyze
from lowbit.analysis.tensorwise import match_by_qparams, quantized_activation_errors
from lowbit.cli.sources import load_data_source, load_model_source
from lowbit.export.onnx_export import export_onnx
from lowbit.analysis.onnx_tensors import (OUTPUT_CONSUMER, analyze_onnx, first_nonfinite, quantized_tensors, to_json,
                                          worst_tensors)
from lowbit.observers import OBSERVERS
from lowbit.outdir import staged_output
from lowbit.outdir import check_output_dir
from lowbit.ptq.passes import quantize
from lowbit.report.engine_html import engine_section
from lowbit.report.html import as_float, render_analysis_html
from lowbit.transforms.recipe import PRESETS, load_recipe
from lowbit.zoo import DATA_NAMES, MODEL_NAMES

log = logging.getLogger(__name__)
console = Console()
N_WORST = 5


def add_analyze_args(p: argparse.ArgumentParser) -> None:
    """The ``analyze`` subcommand's options."""
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(MODEL_NAMES)}) or package.module:callable")
    p.add_argument("--data", required=True, help=f"zoo data ({', '.join(DATA_NAMES)}), an image folder, or a .npy/.pt file")
    p.add_argument("--recipe", default="int8", help=f"preset ({', '.join(PRESETS)}) or a YAML recipe file")
    p.add_argument("--calibrator", default=None, choices=sorted(OBSERVERS), help="activation calibrator (overrides the recipe)")
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


def _progress_callback(progress: Progress) -> Callable[[int, int, str], None]:
    """``progress(done, total, label)`` for :func:`lowbit.analysis.analyze`, driving one rich task."""
    task = progress.add_task("sensitivity sweep", total=None)

    def update(done: int, total: int, label: str) -> None:
        progress.update(task, completed=done, total=total, description=f"sensitivity: {label}")
    return update


def _write(staging: Path, analysis: dict, title: str, engine: dict | None) -> None:
    (staging / "analysis.json").write_text(json.dumps(analysis, indent=2) + "\n")
    if engine is not None:
        (staging / "analysis_onnxruntime.json").write_text(json.dumps(engine, indent=2) + "\n")
    sections = () if engine is None else (engine_section(engine),)
    (staging / "analysis.html").write_text(render_analysis_html(analysis, title, sections), encoding="utf-8")


def _with_simulation(rows: list[dict], int8: onnx.ModelProto, q, eval_inputs, batch_size: int) -> bool:
    """Add the simulation's figures for the same tensors to the engine ``rows`` (in place); False if unmatched.

    The ``i``-th QuantizeLinear of the INT8 graph is the ``i``-th activation-quantizer call of the simulation
    (both in execution order); equal scales and zero-points confirm it (see ``tensorwise.match_by_qparams``).
    """
    errors, output = quantized_activation_errors(q, eval_inputs, batch_size)
    tensors = quantized_tensors(int8)
    matched = match_by_qparams(errors, [(t.scale, t.zero_point) for t in tensors])
    if not matched:
        log.warning("engine analysis: %d QuantizeLinear nodes vs %d simulated quantizer calls do not line up; "
                    "simulation figures left out", len(tensors), len(errors))
        return False
    sims, outputs = iter(errors), 0
    for row in rows:
        if row["consumer"] == OUTPUT_CONSUMER:
            outputs += 1
            if outputs > 1:  # the simulation measures the first model output only
                continue
            name, stats = None, output
        else:
            err = next(sims)
            name, stats = err.quantizer, err.stats
        row.update({"quantizer": name, "sim_sqnr_db": stats.sqnr_db(), "sim_cosine": stats.cosine(),
                    "sim_mse": stats.mse()})
    return True


def engine_analysis(src, calib, eval_inputs, recipe, batch_size: int) -> dict:
    """Quantize a copy, export FP32 + INT8 ONNX to a temporary folder, run :func:`analyze_onnx` on ``eval_inputs``.

    Args:
        src: the :class:`~lowbit.cli.sources.ModelSource` (float model and example input).
        calib: calibration inputs (the same samples the simulation analysis calibrates on).
        eval_inputs: the inputs both ONNX models are compared on.
        recipe: the quantization recipe.
        batch_size: samples per ONNX Runtime run.

    Returns:
        the ``analysis_onnxruntime.json`` content (rows JSON-ready, see :func:`to_json`); when the
        simulation lines up with the graph (``simulation_matched``), every row also has ``quantizer``,
        ``sim_sqnr_db``, ``sim_cosine`` and ``sim_mse`` of the same tensor in the PyTorch simulation.
    """
    t0 = time.perf_counter()
    q = quantize(src.model, calib, recipe, src.example_input, show_progress=False)
    with tempfile.TemporaryDirectory(prefix="lowbit-analyze-onnx-") as tmp:
        fp32 = export_onnx(q, src.example_input, Path(tmp) / "model_fp32.onnx", float_model=True, check_parity=False)
        int8 = export_onnx(q, src.example_input, Path(tmp) / "model_int8.onnx", check_parity=False)
        rows = analyze_onnx(fp32, int8, eval_inputs, batch_size=batch_size)
        matched = _with_simulation(rows, onnx.load(str(int8)), q, eval_inputs, batch_size)
    return {"engine": "onnxruntime", "rows": to_json(rows), "first_nonfinite_tensor": first_nonfinite(rows),
            "samples": int(eval_inputs.shape[0]), "simulation_matched": matched, "seconds": time.perf_counter() - t0}


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
    """Load model / data / recipe, analyse, write ``analysis.json`` + ``analysis.html`` into ``args.out``."""
    out_dir = Path(args.out)
    check_output_dir(out_dir, args.force)
    recipe = load_recipe(args.recipe)
    if args.calibrator:
        recipe = recipe.with_calibrator(args.calibrator)
    if args.budget_seconds < 0:
        raise ValueError(f"--budget-seconds {args.budget_seconds}: must be >= 0")
    src = load_model_source(args.model, args.input_shape)
    calib, evalset = load_data_source(args.data, src, args.n_calib, args.n_eval)
    engine = None
    with staged_output(out_dir, args.force) as staging:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            result = analyze(src.model, calib, recipe, src.example_input, budget_seconds=args.budget_seconds,
                             batch_size=args.batch_size, progress=_progress_callback(progress))
        analysis = result.to_json()
        analysis.update({"model": src.name, "data": args.data, "recipe": args.recipe,
                         "calibrator": recipe.default_input.calibrator, "samples": int(calib.shape[0])})
        if getattr(args, "engine", "simulation") == "onnxruntime":
            engine = engine_analysis(src, calib, evalset.inputs, recipe, args.batch_size)
            engine.update({"model": src.name, "data": args.data, "recipe": args.recipe})
        _write(staging, analysis, f"lowbit analysis: {src.name} ({args.recipe})", engine)
    print_worst(analysis, out_dir)
    if engine is not None:
        print_worst_tensors(engine)
        console.print(f"wrote {escape(str(out_dir))}/analysis_onnxruntime.json", highlight=False, soft_wrap=True)
    return 0
