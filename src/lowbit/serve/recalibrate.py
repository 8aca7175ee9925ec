"""Re-calibration on field data: a new INT8 version from recent inputs, kept only if it is better.

Given inputs ``X`` (the server's reservoir or a data set), for the active version ``vK`` of ``DIR``:

1. split ``X`` with a fixed seed into calibration rows and held-out rows (every ``1/eval_fraction``-th row of a
   permutation is held out);
2. rebuild the float PyTorch model named in ``vK/report.json`` (``model``: a zoo name or ``module:callable``)
   and quantize it with the recipe of ``vK/recipe.yaml`` (passes included) on the calibration rows, through
   :func:`lowbit.pipeline.quantize_to_dir`, into ``DIR/versions/vN`` (its report and parity check included);
3. score the candidate and ``vK``'s INT8 model on the held-out rows against one float reference (the
   candidate's FP32 ONNX): top-1 agreement, KL(FP32 ‖ INT8) of softmax outputs, output SQNR;
4. accept the candidate only if its parity check passed and it is strictly better:
   ``agreement_new > agreement_old``, or equal agreement and ``kl_new < kl_old``. An accepted version becomes
   the active one (``versions/active.json``); a rejected one stays on disk with its ``recalibration.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.analysis import metrics
from lowbit.export.runtime import make_session
from lowbit.pipeline import quantize_to_dir
from lowbit.report.evaluate import EvalSet, batched_predict
from lowbit.serve.models import (
    active_version,
    check_model_dir,
    next_version,
    set_active_version,
    version_dir,
    write_json_atomic,
)
from lowbit.transforms.recipe import load_recipe

log = logging.getLogger(__name__)

ModelLoader = Callable[[str, tuple[int, ...]], tuple[nn.Module, torch.Tensor]]
"""``(model name from report.json, sample shape) -> (float eval-mode model, example input [1, ...])``."""


@dataclass(frozen=True)
class RecalibrationResult:
    """What one re-calibration did (also written to ``versions/vN/recalibration.json``)."""

    version: str
    previous: str
    accepted: bool
    reason: str
    folder: Path
    calib_samples: int
    eval_samples: int
    parity_ok: bool
    candidate: dict
    current: dict

    def to_dict(self) -> dict:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


def split_holdout(inputs: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(calibration rows, held-out rows)``: every ``round(1/eval_fraction)``-th row of a seeded permutation."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction}: must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(inputs.shape[0])
    step = max(2, round(1.0 / eval_fraction))
    held = np.zeros(inputs.shape[0], dtype=bool)
    held[order[::step]] = True
    return inputs[~held], inputs[held]


def score(fp32_path: Path, int8_path: Path, x: torch.Tensor, threads: int) -> dict:
    """Top-1 agreement, KL and output SQNR of an INT8 model against an FP32 model on ``x`` (ONNX Runtime)."""
    ref = batched_predict(make_session(fp32_path, threads))(x)
    out = batched_predict(make_session(int8_path, threads))(x)
    return {"top1_agreement": metrics.top1_agreement(ref, out), "kl": metrics.kl_softmax(ref, out),
            "sqnr_db": metrics.sqnr_db(ref, out)}


def is_better(candidate: dict, current: dict) -> tuple[bool, str]:
    """The acceptance rule of the module docstring, with the reason in words."""
    a_new, a_old = candidate["top1_agreement"], current["top1_agreement"]
    figures = (f"top-1 agreement {a_new:.4f} vs {a_old:.4f}, KL {candidate['kl']:.3g} vs {current['kl']:.3g} nats")
    if a_new > a_old or (a_new == a_old and candidate["kl"] < current["kl"]):
        return True, f"better: {figures}"
    return False, f"not better: {figures}"


def read_model_name(folder: Path) -> str:
    """The float model (zoo name or ``module:callable``) recorded in ``folder/report.json``."""
    try:
        name = json.loads((folder / "report.json").read_text()).get("model")
    except ValueError:
        raise ValueError(f"{folder / 'report.json'}: malformed JSON") from None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{folder / 'report.json'}: no 'model' key naming the float model to re-calibrate")
    return name


def recalibrate(model_dir: str | Path, inputs: np.ndarray | torch.Tensor, load_float_model: ModelLoader,
                data_label: str = "reservoir", threads: int = 1, eval_fraction: float = 0.25, seed: int = 0,
                repeats: int = 5) -> RecalibrationResult:
    """Build, check and (if better) activate a new INT8 version of ``model_dir`` from ``inputs`` ``[N, ...]``.

    Raises:
        ValueError: too few inputs, inputs of the wrong shape, or a model folder without what it needs.
    """
    model_dir = Path(model_dir)
    current = active_version(model_dir)
    cur_dir = version_dir(model_dir, current)
    check_model_dir(cur_dir)
    x = torch.as_tensor(np.asarray(inputs, dtype=np.float32))
    name = read_model_name(cur_dir)
    recipe = load_recipe(cur_dir / "recipe.yaml")
    model, example = load_float_model(name, tuple(x.shape[1:]))
    if tuple(example.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"inputs have rows of shape {tuple(x.shape[1:])}; model {name!r} takes "
                         f"{tuple(example.shape[1:])}")
    calib, held = split_holdout(x.numpy(), eval_fraction, seed)
    if held.shape[0] < 2 or calib.shape[0] < 2:
        raise ValueError(f"{x.shape[0]} input rows are too few to re-calibrate (need calibration and held-out rows)")
    calib_t, held_t = torch.from_numpy(calib), torch.from_numpy(held)
    version = next_version(model_dir)
    new_dir = version_dir(model_dir, version)
    labels = {"model": name, "data": data_label, "recipe": str(cur_dir / "recipe.yaml"),
              "calibrator": recipe.default_input.calibrator, "recalibrated_from": current}
    log.info("re-calibrating %s %s on %d rows (%d held out) into %s", model_dir, current, calib.shape[0],
             held.shape[0], new_dir)
    result = quantize_to_dir(model, example, calib_t, recipe, new_dir,
                             EvalSet(held_t, note=f"held-out {data_label} rows"), labels=labels, threads=threads,
                             repeats=repeats, show_progress=False)
    reference = new_dir / "model_fp32.onnx"
    cand = score(reference, new_dir / "model_int8.onnx", held_t, threads)
    cur = score(reference, cur_dir / "model_int8.onnx", held_t, threads)
    parity_ok = bool(result.report.get("parity_ok"))
    accepted, reason = is_better(cand, cur)
    if not parity_ok:
        accepted, reason = False, "parity check failed: ONNX Runtime and the simulation disagree"
    outcome = RecalibrationResult(version, current, accepted, reason, new_dir, int(calib.shape[0]),
                                  int(held.shape[0]), parity_ok, cand, cur)
    write_json_atomic(new_dir / "recalibration.json", outcome.to_dict())
    if accepted:
        set_active_version(model_dir, version)
    log.warning("re-calibration %s from %s: %s", version, current, reason)
    return outcome
