"""The quantize job: float model + calibration data + recipe → INT8 ONNX that ONNX Runtime runs (or, for recipe
target ``litert``, an int8 ``.tflite`` run by the LiteRT interpreter: :mod:`lowbit.jobs.litert`), and a report.

    static:  prepare_ → calibrate → convert_ (and the recipe's passes) → export FP32 and INT8 ONNX
             → measure both on ONNX Runtime → write DIR
    dynamic: quantize_dynamic_ (no calibration) → the same

Models whose outputs are embeddings (token-id inputs, ``embedding=True``) and dynamic mode are measured with
the embedding report (:mod:`lowbit.report.token_models`); everything else with :mod:`lowbit.report.evaluate`.

Everything is written into a staging folder beside ``DIR`` and renamed into place at the end, so a failure
leaves nothing partial, and an existing ``DIR`` is replaced only with ``force=True``; ``DIR`` is locked for the
run, so a second writer fails (or, with ``force``, waits) instead of interleaving (:mod:`lowbit.outdir`).
The folder also records the float model's weight hash, the recipe hash and the trusted evaluation rows that
re-calibration checks new versions against (:mod:`lowbit.provenance`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.device import on_cpu, place
from lowbit.data import Data
from lowbit.jobs.outputs import export_models, float_layers, run_facts, write_report
from lowbit.outdir import staged_output
from lowbit.provenance import save_trusted_set, text_sha256, weights_sha256
from lowbit.ptq.passes import quantize
from lowbit.report import token_models
from lowbit.report.engine_ops import merge_float_layers
from lowbit.report.evaluate import EvalSet, evaluate_pair
from lowbit.transforms.pass_registry import ordered
from lowbit.transforms.dynamic import quantize_dynamic_
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

MODES = ("static", "dynamic")


@dataclass
class QuantizeResult:
    """What ``quantize_to_dir`` produced: the quantized model, the report (as written to ``report.json``) and
    the folder."""

    model: nn.Module
    report: dict
    out_dir: Path


PTQResult = QuantizeResult  # the name before the job layer


def quantize_to_dir(
    model: nn.Module,
    example_input: torch.Tensor,
    calib_data: Data | None,
    recipe: Recipe,
    out_dir: str | Path,
    eval_set: EvalSet | torch.Tensor,
    force: bool = False,
    labels: dict | None = None,
    threads: int = 2,
    repeats: int = 20,
    show_progress: bool = True,
    on_report: Callable[[dict, Path], None] | None = None,
    pass_batches: int | None = None,
    mode: str = "static",
    embedding: bool = False,
    io: str = "float",
    device: str | torch.device | None = None,
    memory_budget_mb: float | None = None,
) -> QuantizeResult:
    """Run the whole quantize job and write ``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.yaml``,
    ``report.json``, ``report.md`` (and ``calibration.cache`` for target tensorrt) into ``out_dir``.

    Args:
        calib_data: calibration batches (static mode; dynamic mode needs none).
        eval_set: what the report is measured on (a Tensor: its inputs, unlabelled; token ids stay int64).
        labels: extra descriptive fields for the report (``model``, ``recipe``, ``calibrator``, ...).
        on_report: called as ``on_report(report, staging_dir)`` before ``report.json`` is written; it may add
            keys to the report and files to the folder (the mixed-precision search adds ``search``).
        pass_batches: calibration batches the recipe's post-training passes see (None: all).
        mode: ``static`` (calibrated activations) or ``dynamic`` (activations quantized at run time).
        embedding: report embedding metrics (mean cosine, nearest-neighbour agreement) instead of top-1.
        io: target ``litert`` only: ``float`` input / output (default) or ``int8`` tensors.
        device: where calibration, the passes and the simulation run (``cpu``, ``cuda``, ``auto`` or a
            ``torch.device``; None: ``model``'s device). Export and ONNX Runtime work on a CPU copy.
        memory_budget_mb: activations GPTQ / AdaRound / bias correction may keep between layers
            (``lowbit.ptq.frontier``; None: 2 GiB; 0: none, the model is re-run up to each layer).

    Target ``litert`` writes ``model_fp32.tflite`` / ``model_int8.tflite`` instead of the ONNX files and measures
    them on the LiteRT interpreter (:mod:`lowbit.jobs.litert`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; modes: {', '.join(MODES)}")
    if not isinstance(eval_set, EvalSet):
        eval_set = EvalSet(eval_set)
    recipe = recipe.for_machine()  # this machine's weight bits, written into recipe.yaml
    model = place(model, device)
    if mode == "dynamic" or embedding:
        return _quantize_mode_to_dir(model, example_input, calib_data, recipe, Path(out_dir), eval_set, mode,
                                     embedding, force, labels, threads, repeats)
    out_dir = Path(out_dir)
    provenance = {"model_sha256": weights_sha256(model), "recipe_sha256": text_sha256(recipe.to_yaml())}
    with staged_output(out_dir, force) as staging:
        t0 = time.perf_counter()
        pass_seconds: dict[str, float] = {}
        qmodel = quantize(model, calib_data, recipe, example_input, show_progress, pass_batches, pass_seconds,
                          memory_budget_mb=memory_budget_mb)
        calib_seconds = time.perf_counter() - t0
        report = {**(labels or {}), **_outputs_and_figures(staging, qmodel, example_input, recipe, eval_set,
                                                            threads, repeats, io)}
        report.update({
            "target": recipe.target,
            "calib_seconds": calib_seconds,
            "passes": ordered(recipe.passes),  # in the order they ran
            "pass_seconds": pass_seconds,
            "capture": getattr(getattr(qmodel, "lowbit_info", None), "capture", ""),
            **run_facts(),
            **provenance,
        })
        save_trusted_set(staging, eval_set)
        if on_report is not None:
            on_report(report, staging)
        write_report(staging, report)
    return QuantizeResult(qmodel, report, out_dir)


def _outputs_and_figures(staging: Path, qmodel: nn.Module, example: torch.Tensor, recipe: Recipe,
                         eval_set: EvalSet, threads: int, repeats: int, io: str) -> dict:
    """Write the two models (ONNX, or ``.tflite`` for target litert) and ``recipe.yaml``; return their measured
    figures with ``float_layers``. The files are written from one CPU copy of a model on another device; the
    simulated metric runs where the model is."""
    cpu_model = on_cpu(qmodel)
    if recipe.target == "litert":
        from lowbit.jobs.litert import litert_outputs_and_figures  # the LiteRT packages load only here

        figures = litert_outputs_and_figures(staging, cpu_model, example, eval_set, threads, repeats, io)
        (staging / "recipe.yaml").write_text(recipe.to_yaml())
        # the flatbuffer says what runs in float (the converter quantizes e.g. a sigmoid between two quantizers
        # itself); lowbit's own list adds the layers a recipe rule keeps float
        ruled = [f for f in float_layers(qmodel) if "recipe rule" in f["reason"]]
        return {**figures, "float_layers": ruled + figures.pop("float_compute")}
    fp32_path, int8_path = export_models(staging, cpu_model, cpu_model, example, recipe)
    figures = evaluate_pair(fp32_path, int8_path, qmodel, eval_set, threads, repeats)
    return {**figures, "float_layers": merge_float_layers(float_layers(qmodel), figures["float_heavy_ops"])}


def _quantize_mode_to_dir(model: nn.Module, example_input: torch.Tensor, calib_data: Data | None, recipe: Recipe,
                          out_dir: Path, eval_set: EvalSet, mode: str, embedding: bool, force: bool,
                          labels: dict | None, threads: int, repeats: int) -> QuantizeResult:
    """Dynamic mode, or static mode measured with the embedding report (models with token-id inputs)."""
    with staged_output(out_dir, force) as staging:
        t0 = time.perf_counter()
        if mode == "dynamic":
            qmodel = quantize_dynamic_(copy.deepcopy(model).eval(), recipe)
        elif calib_data is None:
            raise ValueError("static quantization needs calibration data")
        else:
            qmodel = quantize(model, calib_data, recipe, example_input, show_progress=False)
        seconds = time.perf_counter() - t0
        fp32_path, q_path = export_models(staging, model, qmodel, example_input, recipe, dynamic=mode)
        report = {**(labels or {}), "mode": mode, "target": recipe.target, "quantize_seconds": seconds}
        report.update(token_models.evaluate_onnx_pair(fp32_path, q_path, qmodel, eval_set.inputs, embedding,
                                                          threads, repeats, eval_set.note))
        report.update({"float_layers": merge_float_layers(float_layers(qmodel), report["float_heavy_ops"]),
                       **run_facts()})
        write_report(staging, report, token_models.to_json, token_models.to_markdown)
    return QuantizeResult(qmodel, report, out_dir)
