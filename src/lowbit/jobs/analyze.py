"""The analyze job: where a quantized model loses accuracy, why, and which recipe rule fixes it, into a folder.

``DIR/analysis.json`` and ``DIR/analysis.html`` (staged beside ``DIR`` and renamed into place, so a failure
leaves nothing partial): :func:`lowbit.analysis.analyze` on the calibration samples. With ``engine=True`` it
also quantizes a copy on the same samples, exports it to FP32 and INT8 ONNX in a temporary folder, compares
every quantized activation as ONNX Runtime computes it with the FP32 export on the evaluation samples
(:func:`lowbit.analysis.onnx_tensors.analyze_onnx`), measures the same tensors in the PyTorch simulation
(:func:`lowbit.analysis.tensorwise.quantized_activation_errors`), writes ``DIR/analysis_onnxruntime.json`` and
adds an "ONNX Runtime vs simulation" section to ``analysis.html``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from lowbit.device import place
from lowbit.analysis import analyze
from lowbit.analysis.onnx_tensors import OUTPUT_CONSUMER, analyze_onnx, first_nonfinite, quantized_tensors, to_json
from lowbit.analysis.tensorwise import match_by_qparams, quantized_activation_errors
from lowbit.export.onnx_static import export_onnx
from lowbit.outdir import check_output_dir, staged_output
from lowbit.ptq.passes import quantize
from lowbit.report.engine_html import engine_section
from lowbit.report.html import render_analysis_html
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class AnalyzeResult:
    """What ``analyze_to_dir`` wrote: ``analysis.json`` (and ``analysis_onnxruntime.json``) contents."""

    analysis: dict
    engine: dict | None
    out_dir: Path


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


def engine_analysis(model: nn.Module, example_input: torch.Tensor, calib, eval_inputs, recipe: Recipe,
                    batch_size: int) -> dict:
    """Quantize a copy, export FP32 + INT8 ONNX to a temporary folder, run :func:`analyze_onnx` on ``eval_inputs``.

    Args:
        model, example_input: the float model and one input batch.
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
    q = quantize(model, calib, recipe, example_input, show_progress=False)
    with tempfile.TemporaryDirectory(prefix="lowbit-analyze-onnx-") as tmp:
        fp32 = export_onnx(q, example_input, Path(tmp) / "model_fp32.onnx", float_model=True, check_parity=False)
        int8 = export_onnx(q, example_input, Path(tmp) / "model_int8.onnx", check_parity=False)
        rows = analyze_onnx(fp32, int8, eval_inputs, batch_size=batch_size)
        matched = _with_simulation(rows, onnx.load(str(int8)), q, eval_inputs, batch_size)
    return {"engine": "onnxruntime", "rows": to_json(rows), "first_nonfinite_tensor": first_nonfinite(rows),
            "samples": int(eval_inputs.shape[0]), "simulation_matched": matched, "seconds": time.perf_counter() - t0}


def analyze_to_dir(model: nn.Module, example_input: torch.Tensor, calib, eval_inputs: torch.Tensor, recipe: Recipe,
                   out_dir: str | Path, force: bool = False, labels: dict | None = None, title: str = "",
                   budget_seconds: float = 60.0, batch_size: int = 8, engine: bool = False,
                   progress: Callable[[int, int, str], None] | None = None,
                   device: str | torch.device | None = None) -> AnalyzeResult:
    """Analyse ``model`` quantized with ``recipe`` on ``calib`` and write the analysis folder (module doc).

    Args:
        labels: descriptive fields added to both JSON files (``model``, ``data``, ``recipe``).
        engine: also analyse the exported INT8 model on ONNX Runtime on ``eval_inputs``.
        progress: ``progress(done, total, label)`` for the sensitivity sweeps.
        device: where quantization and the analysis run (``cpu``, ``cuda``, ``auto``; None: ``model``'s).
    """
    out_dir = Path(out_dir)
    model = place(model, device)
    check_output_dir(out_dir, force)
    recipe = recipe.for_machine()
    engine_json = None
    with staged_output(out_dir, force) as staging:
        result = analyze(model, calib, recipe, example_input, budget_seconds=budget_seconds, batch_size=batch_size,
                         progress=progress)
        analysis = result.to_json()
        analysis.update({**(labels or {}), "calibrator": recipe.default_input.calibrator,
                         "samples": int(len(calib))})
        if engine:
            engine_json = engine_analysis(model, example_input, calib, eval_inputs, recipe, batch_size)
            engine_json.update(labels or {})
        _write(staging, analysis, title, engine_json)
    return AnalyzeResult(analysis, engine_json, out_dir)
