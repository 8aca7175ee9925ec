"""The LiteRT branch of the main job: ``model_fp32.tflite`` / ``model_int8.tflite`` and their figures.

Called by :func:`lowbit.jobs.quantize_to_dir` for recipes with ``target: litert``; the quantized model is the
same one every target gets (prepare → calibrate → passes → convert), only the export and the measurements differ.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.export.litert import require_litert, to_tflite, write_tflite
from lowbit.report.evaluate import EvalSet
from lowbit.report.litert import evaluate_litert_pair, float_compute_layers

log = logging.getLogger(__name__)

IO_MODES = ("float", "int8")


def litert_version() -> str:
    """Installed ``ai-edge-litert`` and ``litert-torch`` versions."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("ai-edge-litert", "litert-torch"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def litert_outputs_and_figures(staging: Path, qmodel: nn.Module, example: torch.Tensor, eval_set: EvalSet,
                               threads: int, repeats: int, io: str = "float") -> dict:
    """Write both ``.tflite`` files into ``staging`` and return the report figures measured on them.

    Args:
        io: ``float`` (the INT8 file quantizes / dequantizes inside) or ``int8`` (int8 input and output tensors).
    """
    if io not in IO_MODES:
        raise ValueError(f"--io must be one of {', '.join(IO_MODES)}, got {io!r}")
    require_litert()
    fp32_path = write_tflite(to_tflite(qmodel, example, float_model=True), staging / "model_fp32.tflite")
    int8_path = write_tflite(to_tflite(qmodel, example, io=io), staging / "model_int8.tflite")
    fig = evaluate_litert_pair(fp32_path, int8_path, qmodel, eval_set, threads, max(repeats, 30))
    fig["io"] = io
    fig["litert_version"] = litert_version()
    fig["float_compute"] = float_compute_layers(fig)
    return fig
