"""Dynamic quantization (and static PTQ of models with token-id inputs) to a folder, with a report.

    dynamic: quantize_dynamic_ (no calibration) → export FP32 and INT8 ONNX → measure both → write DIR
    static:  prepare_ → calibrate → convert_ (and the recipe's passes) → the same

Used by ``lowbit quantize --mode dynamic`` and by ``lowbit quantize`` on embedding data (``sentences``).
Outputs are staged beside ``DIR`` and renamed into place, as in :mod:`lowbit.pipeline`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import time
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from lowbit.export.dynamic_onnx import export_dynamic_onnx
from lowbit.export.onnx_export import export_onnx
from lowbit.outdir import staged_output
from lowbit.pipeline import PTQResult, __version__, machine_description
from lowbit.data import Data
from lowbit.ptq.passes import quantize_with_passes
from lowbit.report.embedding import evaluate_onnx_pair, to_json, to_markdown
from lowbit.report.engine_ops import merge_float_layers
from lowbit.transforms.dynamic import quantize_dynamic_
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

MODES = ("dynamic", "static")


def _quantize(model: nn.Module, example: torch.Tensor, calib: Data | None, recipe: Recipe, mode: str) -> nn.Module:
    if mode == "dynamic":
        return quantize_dynamic_(copy.deepcopy(model).eval(), recipe)
    if calib is None:
        raise ValueError("static quantization needs calibration data")
    return quantize_with_passes(model, calib, recipe, example, show_progress=False)  # the recipe's passes too


def _float_layers(model: nn.Module) -> list[dict]:
    info = getattr(model, "lowbit_info", None)
    return [{"layer": name, "reason": why} for name, why in (info.float_layers if info else [])]


def quantize_mode_to_dir(model: nn.Module, example_input: torch.Tensor, calib_data: Data | None, recipe: Recipe,
                         out_dir: str | Path, eval_inputs: torch.Tensor, mode: str = "dynamic", embedding: bool = False,
                         force: bool = False, labels: dict | None = None, threads: int = 2, repeats: int = 20,
                         note: str = "") -> PTQResult:
    """Quantize (``mode`` dynamic or static), export, measure on ONNX Runtime and write the five outputs.

    Args:
        calib_data: calibration batches (static mode only; dynamic mode needs none).
        eval_inputs: evaluation inputs (any dtype: token ids stay int64).
        embedding: report embedding metrics (mean cosine, nearest-neighbour agreement) instead of top-1.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; modes: {', '.join(MODES)}")
    out_dir = Path(out_dir)
    with staged_output(out_dir, force) as staging:
        t0 = time.perf_counter()
        qmodel = _quantize(model, example_input, calib_data, recipe, mode)
        seconds = time.perf_counter() - t0
        fp32_path, q_path = staging / "model_fp32.onnx", staging / "model_int8.onnx"
        export_dynamic_onnx(model.eval(), example_input, fp32_path, check_parity=False)
        if mode == "dynamic":
            export_dynamic_onnx(qmodel, example_input, q_path, check_parity=False)
        else:
            export_onnx(qmodel, example_input, q_path, target=recipe.target, check_parity=False)
        (staging / "recipe.yaml").write_text(recipe.to_yaml())
        report = {**(labels or {}), "mode": mode, "target": recipe.target, "quantize_seconds": seconds}
        report.update(evaluate_onnx_pair(fp32_path, q_path, qmodel, eval_inputs, embedding, threads, repeats, note))
        report.update({
            "float_layers": merge_float_layers(_float_layers(qmodel), report["float_heavy_ops"]),
            "lowbit_version": __version__,
            "onnxruntime_version": onnxruntime.__version__, "torch_version": torch.__version__,
            "machine": machine_description(), "date": _dt.date.today().isoformat(),
        })
        (staging / "report.json").write_text(to_json(report))
        (staging / "report.md").write_text(to_markdown(report))
    return PTQResult(qmodel, report, out_dir)
