"""What every job writes into its folder, in one place: the two ONNX models, ``recipe.yaml``, the run facts
and ``report.json`` / ``report.md``.

A job stages its folder with :func:`lowbit.outdir.staged_output` (locked, staged beside ``DIR``, renamed into
place at the end; a failure leaves nothing), fills it with :func:`export_models`, measures, adds
:func:`run_facts`, and finishes with :func:`write_report`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from lowbit.export.onnx_dynamic import export_dynamic_onnx
from lowbit.export.onnx_static import export_onnx
from lowbit.export.trt_cache import write_trt_calibration_cache
from lowbit.report.render import to_json, to_markdown
from lowbit.transforms.recipe import Recipe

__version__ = "0.1.0"


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


def float_layers(model: nn.Module) -> list[dict]:
    """The layers ``prepare_`` left in float, with the reason (``report.json``'s ``float_layers`` rows)."""
    info = getattr(model, "lowbit_info", None)
    return [{"layer": name, "reason": why} for name, why in (info.float_layers if info else [])]


def run_facts() -> dict:
    """Versions, machine and date, the closing keys of every report."""
    return {
        "lowbit_version": __version__,
        "onnxruntime_version": onnxruntime.__version__,
        "torch_version": torch.__version__,
        "machine": machine_description(),
        "date": _dt.date.today().isoformat(),
    }


def export_models(staging: Path, float_model: nn.Module, qmodel: nn.Module, example: torch.Tensor, recipe: Recipe,
                  dynamic: str | None = None) -> tuple[Path, Path]:
    """``model_fp32.onnx`` (from ``float_model``), ``model_int8.onnx`` (from ``qmodel``), ``recipe.yaml`` and,
    for target tensorrt, ``calibration.cache``. Parity is checked by the report, not here.

    ``dynamic`` (the quantization mode, for models that may take token ids): the FP32 model is traced as it is
    (no quantizer to switch off), and a ``"dynamic"`` model exports as DynamicQuantizeLinear + MatMulInteger.
    """
    fp32_path, int8_path = staging / "model_fp32.onnx", staging / "model_int8.onnx"
    if dynamic is None:
        export_onnx(float_model, example, fp32_path, target=recipe.target, float_model=True)
    else:
        export_dynamic_onnx(float_model.eval(), example, fp32_path, check_parity=False)
    if dynamic == "dynamic":
        export_dynamic_onnx(qmodel, example, int8_path, check_parity=False)
    else:
        export_onnx(qmodel, example, int8_path, target=recipe.target, check_parity=False)
    if recipe.target == "tensorrt" and dynamic is None:
        write_trt_calibration_cache(int8_path, staging / "calibration.cache")
    (staging / "recipe.yaml").write_text(recipe.to_yaml())
    return fp32_path, int8_path


def write_report(staging: Path, report: dict, render_json: Callable[[dict], str] = to_json,
                 render_markdown: Callable[[dict], str] = to_markdown, markdown_tail: str = "") -> None:
    """``report.json`` and ``report.md`` (plus ``markdown_tail``, e.g. a training log)."""
    (staging / "report.json").write_text(render_json(report))
    (staging / "report.md").write_text(render_markdown(report) + markdown_tail)
