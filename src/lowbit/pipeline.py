"""The main job: float model + calibration data + recipe → INT8 ONNX that ONNX Runtime runs, and a report.

    prepare_ → calibrate → convert_ → export FP32 and INT8 ONNX → measure both on ONNX Runtime → write DIR

Everything is written into a staging folder beside ``DIR`` and renamed into place at the end, so a failure
leaves nothing partial, and an existing ``DIR`` is replaced only with ``force=True``; ``DIR`` is locked for the
run, so a second writer fails (or, with ``force``, waits) instead of interleaving (:mod:`lowbit.outdir`).
The folder also records the float model's weight hash, the recipe hash and the trusted evaluation rows that
re-calibration checks new versions against (:mod:`lowbit.provenance`).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from lowbit.export.onnx_export import export_onnx
from lowbit.export.trt_cache import write_trt_calibration_cache
from lowbit.outdir import (  # noqa: F401 — re-exported: the CLI and older callers import them from here
    OutputExistsError,
    OutputLockedError,
    OutputPathError,
    check_output_dir,
    commit_dir,
    staged_output,
)
from lowbit.provenance import save_trusted_set, text_sha256, weights_sha256
from lowbit.ptq.calibrate import Data
from lowbit.ptq.passes import ordered, quantize_with_passes
from lowbit.report.engine_ops import merge_float_layers
from lowbit.report.evaluate import EvalSet, evaluate_pair
from lowbit.report.render import to_json, to_markdown
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

__version__ = "0.1.0"


@dataclass
class PTQResult:
    """What ``quantize_to_dir`` produced."""

    model: nn.Module
    report: dict
    out_dir: Path


def machine_description() -> str:
    """CPU model name and core count, for reports and benchmarks."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _float_layers(model: nn.Module) -> list[dict]:
    info = getattr(model, "lowbit_info", None)
    return [{"layer": name, "reason": why} for name, why in (info.float_layers if info else [])]


def _write_outputs(staging: Path, model: nn.Module, example: torch.Tensor, recipe: Recipe) -> tuple[Path, Path]:
    fp32_path, int8_path = staging / "model_fp32.onnx", staging / "model_int8.onnx"
    export_onnx(model, example, fp32_path, target=recipe.target, float_model=True)
    export_onnx(model, example, int8_path, target=recipe.target, check_parity=False)  # parity: in the report
    if recipe.target == "tensorrt":
        write_trt_calibration_cache(int8_path, staging / "calibration.cache")
    (staging / "recipe.yaml").write_text(recipe.to_yaml())
    return fp32_path, int8_path


def quantize_to_dir(
    model: nn.Module,
    example_input: torch.Tensor,
    calib_data: Data,
    recipe: Recipe,
    out_dir: str | Path,
    eval_set: EvalSet,
    force: bool = False,
    labels: dict | None = None,
    threads: int = 2,
    repeats: int = 20,
    show_progress: bool = True,
    on_report: Callable[[dict, Path], None] | None = None,
    pass_batches: int | None = None,
    io: str = "float",
) -> PTQResult:
    """Run the whole PTQ job and write ``model_fp32.onnx``, ``model_int8.onnx``, ``recipe.yaml``,
    ``report.json``, ``report.md`` (and ``calibration.cache`` for target tensorrt) into ``out_dir``.

    Args:
        labels: extra descriptive fields for the report (``model``, ``recipe``, ``calibrator``, ...).
        on_report: called as ``on_report(report, staging_dir)`` before ``report.json`` is written; it may add
            keys to the report and files to the folder (the mixed-precision search adds ``search``).
        pass_batches: calibration batches the recipe's post-training passes see (None: all).
        io: target ``litert`` only: ``float`` input / output (default) or ``int8`` tensors.

    Target ``litert`` writes ``model_fp32.tflite`` / ``model_int8.tflite`` instead of the ONNX files and measures
    them on the LiteRT interpreter (:mod:`lowbit.pipeline_litert`).
    """
    out_dir = Path(out_dir)
    provenance = {"model_sha256": weights_sha256(model), "recipe_sha256": text_sha256(recipe.to_yaml())}
    with staged_output(out_dir, force) as staging:
        t0 = time.perf_counter()
        pass_seconds: dict[str, float] = {}
        qmodel = quantize_with_passes(model, calib_data, recipe, example_input, show_progress, pass_batches, pass_seconds)
        calib_seconds = time.perf_counter() - t0
        report = dict(labels or {})
        if recipe.target == "litert":
            from lowbit.pipeline_litert import litert_outputs_and_figures

            (staging / "recipe.yaml").write_text(recipe.to_yaml())
            report.update(litert_outputs_and_figures(staging, qmodel, example_input, eval_set, threads, repeats, io))
            # the flatbuffer says what runs in float (the converter quantizes e.g. a sigmoid between two
            # quantizers itself); lowbit's own list adds the layers a recipe rule keeps float
            ruled = [f for f in _float_layers(qmodel) if "recipe rule" in f["reason"]]
            float_layers = ruled + report.pop("float_compute")
        else:
            fp32_path, int8_path = _write_outputs(staging, qmodel, example_input, recipe)
            report.update(evaluate_pair(fp32_path, int8_path, qmodel, eval_set, threads, repeats))
            float_layers = merge_float_layers(_float_layers(qmodel), report["float_heavy_ops"])
        report.update({
            "target": recipe.target,
            "calib_seconds": calib_seconds,
            "passes": ordered(recipe.passes),  # in the order they ran
            "pass_seconds": pass_seconds,
            "float_layers": float_layers,
            "capture": getattr(getattr(qmodel, "lowbit_info", None), "capture", ""),
            "lowbit_version": __version__,
            "onnxruntime_version": onnxruntime.__version__,
            "torch_version": torch.__version__,
            "machine": machine_description(),
            "date": _dt.date.today().isoformat(),
            **provenance,
        })
        save_trusted_set(staging, eval_set)
        if on_report is not None:
            on_report(report, staging)
        (staging / "report.json").write_text(to_json(report))
        (staging / "report.md").write_text(to_markdown(report))
    return PTQResult(qmodel, report, out_dir)
