"""Re-calibration on field data: a new INT8 version from recent inputs, kept only if it is better.

Given inputs ``X`` (the server's reservoir or a data set), for the active version ``vK`` of ``DIR``:

1. split ``X`` with a fixed seed into calibration rows and held-out rows (every ``1/eval_fraction``-th row of a
   permutation is held out);
2. rebuild the float PyTorch model named in ``vK/report.json`` (``model``: a zoo name or ``module:callable``)
   and quantize it with the recipe of ``vK/recipe.yaml`` (passes included) on the calibration rows, through
   :func:`lowbit.jobs.quantize_to_dir`, into ``DIR/versions/vN`` (its report and parity check included);
3. score the candidate and ``vK``'s INT8 model on the held-out rows against one float reference (the
   candidate's FP32 ONNX): top-1 agreement, KL(FP32 ‖ INT8) of softmax outputs, output SQNR;
4. score both on the deployment's *trusted* rows (the quantize-time evaluation rows stored in ``DIR``, or a
   ``.npy`` file the operator passes), which clients cannot touch;
5. accept the candidate only if its parity check passed, it is strictly better on the held-out rows
   (``agreement_new > agreement_old``, or equal agreement and ``kl_new < kl_old``) **and** at least as good on
   the trusted rows (top-1 agreement with FP32 and, when labels are stored, accuracy). An accepted version
   becomes the active one (``versions/active.json``); a rejected one is removed. Every outcome is appended to
   ``versions/recalibrations.jsonl``; at most ``keep_versions`` version folders are kept.

The reservoir's rows cannot poison the result: a client scaling real rows by 10-1000 makes a candidate that
fits those rows but is far worse on the trusted rows, so it is refused. The float model rebuilt is the one
recorded in ``DIR/report.json`` at quantize time, and it must have the recorded weight hash (``model_sha256``);
the recipe must have the recorded ``recipe_sha256`` (see :mod:`lowbit.provenance`). A model folder is still
trusted code: the recorded ``module:callable`` is imported and called. One re-calibration of ``DIR`` runs at a
time (``DIR/.recalibrate.lock``).
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
from lowbit.export.runtime import batched_predict, make_session
from lowbit.outdir import DirLock
from lowbit.jobs.quantize import quantize_to_dir
from lowbit.provenance import check_model_name, load_trusted_set, text_sha256, weights_sha256
from lowbit.report.evaluate import EvalSet
from lowbit.serve.models import (
    active_version,
    check_model_dir,
    next_version,
    set_active_version,
    version_dir,
    write_json_atomic,
)
from lowbit.serve.versions import append_history, clean_stale_versions, prune_versions, remove_version
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
    trusted: dict

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


class RecalibrationBusy(RuntimeError):
    """Another re-calibration of the same folder is running."""


def score(fp32_path: Path, int8_path: Path, x: torch.Tensor, threads: int, labels: np.ndarray | None = None) -> dict:
    """Top-1 agreement, KL and output SQNR of an INT8 model against an FP32 model on ``x`` (ONNX Runtime), and
    the INT8 model's accuracy when ``labels`` are given."""
    ref = batched_predict(make_session(fp32_path, threads))(x)
    out = batched_predict(make_session(int8_path, threads))(x)
    result = {"top1_agreement": metrics.top1_agreement(ref, out), "kl": metrics.kl_softmax(ref, out),
              "sqnr_db": metrics.sqnr_db(ref, out)}
    if labels is not None:
        result["accuracy"] = float((out.argmax(-1).numpy() == labels).mean())
    return result


def is_better(candidate: dict, current: dict) -> tuple[bool, str]:
    """The acceptance rule of the module docstring, with the reason in words."""
    a_new, a_old = candidate["top1_agreement"], current["top1_agreement"]
    figures = (f"top-1 agreement {a_new:.4f} vs {a_old:.4f}, KL {candidate['kl']:.3g} vs {current['kl']:.3g} nats")
    if a_new > a_old or (a_new == a_old and candidate["kl"] < current["kl"]):
        return True, f"better: {figures}"
    return False, f"not better: {figures}"


def trusted_ok(candidate: dict, current: dict) -> tuple[bool, str]:
    """At least as good on the trusted rows: top-1 agreement with FP32, and accuracy when known."""
    keys = [k for k in ("top1_agreement", "accuracy") if k in candidate and k in current]
    worse = [k for k in keys if candidate[k] < current[k]]
    figures = ", ".join(f"{k} {candidate[k]:.4f} vs {current[k]:.4f}" for k in keys)
    if worse:
        return False, f"worse on the trusted rows: {figures}"
    return True, f"trusted rows: {figures}"



def deployment_record(model_dir: Path) -> tuple[str, str, str]:
    """``(model, model_sha256, recipe_sha256)`` recorded at quantize time in ``DIR/report.json`` (checked)."""
    path = Path(model_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: malformed JSON") from None
    name, model_sha, recipe_sha = (report.get(k) if isinstance(report, dict) else None
                                   for k in ("model", "model_sha256", "recipe_sha256"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: no 'model' key naming the float model to re-calibrate")
    if not (isinstance(model_sha, str) and isinstance(recipe_sha, str)):
        raise ValueError(f"{path}: no model_sha256 / recipe_sha256 (written by an older lowbit); quantize the "
                         "model again to enable re-calibration")
    check_model_name(name)
    return name, model_sha, recipe_sha


def read_model_name(folder: Path) -> str:
    """The float model recorded at quantize time in ``folder/report.json`` (zoo name or ``module:callable``)."""
    return deployment_record(folder)[0]


def _trusted_rows(model_dir: Path, trusted: str | Path | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(inputs, labels or None, source)``: the operator's ``.npy`` file or the rows stored at quantize time."""
    if trusted is not None:
        try:
            x = np.load(Path(trusted), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"trusted data {str(trusted)[:200]}: cannot read a .npy array: {str(exc)[:120]}") from None
        return np.asarray(x, dtype=np.float32), None, str(trusted)
    stored = load_trusted_set(model_dir)
    if stored is None:
        raise ValueError(f"{model_dir} has no trusted rows (trusted_inputs.npy); pass --trusted-data FILE.npy")
    return stored[0], stored[1], f"{model_dir}/trusted_inputs.npy"


def clean_rows(x: np.ndarray, fp32_path: Path, threads: int) -> np.ndarray:
    """Finite, distinct rows of ``x`` whose FP32 output is finite (first occurrence order kept)."""
    x = np.asarray(x, dtype=np.float32)
    x = x[np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)]
    _, first = np.unique(x.reshape(x.shape[0], -1), axis=0, return_index=True)
    x = x[np.sort(first)]
    if x.shape[0]:
        out = batched_predict(make_session(fp32_path, threads))(torch.from_numpy(x)).numpy()
        x = x[np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)]
    return x


def _load_checked_model(load_float_model: ModelLoader, record: tuple[str, str, str], shape: tuple[int, ...]):
    name, model_sha, _ = record
    model, example = load_float_model(name, shape)
    if tuple(example.shape[1:]) != shape:
        raise ValueError(f"inputs have rows of shape {shape}; model {name!r} takes {tuple(example.shape[1:])}")
    if weights_sha256(model) != model_sha:
        raise ValueError(f"the float model {name!r} rebuilt now has other weights than the one quantized "
                         f"(model_sha256 {model_sha[:12]}...); refusing to re-calibrate from it")
    return model, example


def recalibrate(model_dir: str | Path, inputs: np.ndarray | torch.Tensor, load_float_model: ModelLoader,
                data_label: str = "reservoir", threads: int = 1, eval_fraction: float = 0.25, seed: int = 0,
                repeats: int = 5, trusted: str | Path | None = None, keep_versions: int = 5) -> RecalibrationResult:
    """Build, check and (if better) activate a new INT8 version of ``model_dir`` from ``inputs`` ``[N, ...]``.

    Raises:
        ValueError: too few usable inputs, inputs of the wrong shape, a folder without its record or trusted rows,
            or a rebuilt model / recipe that does not match the record.
        RecalibrationBusy: another re-calibration of ``model_dir`` is running.
    """
    model_dir = Path(model_dir)
    lock = DirLock(model_dir / ".recalibrate.lock")
    if not lock.acquire(0.0):
        raise RecalibrationBusy(f"another re-calibration of {model_dir} is running ({lock.holder()})")
    try:
        clean_stale_versions(model_dir)
        return _recalibrate_locked(model_dir, inputs, load_float_model, data_label, threads, eval_fraction, seed,
                                   repeats, trusted, keep_versions)
    finally:
        lock.release()


def _recalibrate_locked(model_dir: Path, inputs, load_float_model: ModelLoader, data_label: str, threads: int,
                        eval_fraction: float, seed: int, repeats: int, trusted, keep: int) -> RecalibrationResult:
    current = active_version(model_dir)
    cur_dir = version_dir(model_dir, current)
    check_model_dir(cur_dir)
    record = deployment_record(model_dir)
    recipe_path = model_dir / "recipe.yaml"
    if text_sha256(recipe_path.read_text()) != record[2]:
        raise ValueError(f"{recipe_path} differs from the recipe recorded at quantize time (recipe_sha256)")
    recipe = load_recipe(recipe_path)
    trusted_x, trusted_y, trusted_source = _trusted_rows(model_dir, trusted)
    x = clean_rows(np.asarray(inputs, dtype=np.float32), cur_dir / "model_fp32.onnx", threads)
    model, example = _load_checked_model(load_float_model, record, tuple(x.shape[1:]))
    if tuple(trusted_x.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"trusted rows have shape {tuple(trusted_x.shape[1:])}, the model takes {tuple(x.shape[1:])}")
    calib, held = split_holdout(x, eval_fraction, seed)
    if held.shape[0] < 2 or calib.shape[0] < 2:
        raise ValueError(f"{x.shape[0]} distinct usable input rows are too few to re-calibrate")
    version = next_version(model_dir)
    new_dir = version_dir(model_dir, version)
    labels = {"model": record[0], "data": data_label, "recipe": str(recipe_path), "recalibrated_from": current,
              "calibrator": recipe.default_input.calibrator}
    log.info("re-calibrating %s %s on %d rows (%d held out) into %s", model_dir, current, calib.shape[0],
             held.shape[0], new_dir)
    held_t = torch.from_numpy(held)
    result = quantize_to_dir(model, example, torch.from_numpy(calib), recipe, new_dir,
                             EvalSet(held_t, note=f"held-out {data_label} rows"), labels=labels, threads=threads,
                             repeats=repeats, show_progress=False)
    try:
        outcome = _decide(model_dir, cur_dir, new_dir, version, current, held_t, (trusted_x, trusted_y, trusted_source),
                          bool(result.report.get("parity_ok")), int(calib.shape[0]), threads)
    except BaseException:
        remove_version(model_dir, version)
        raise
    _finish(model_dir, outcome, keep)
    return outcome


def _decide(model_dir: Path, cur_dir: Path, new_dir: Path, version: str, current: str, held: torch.Tensor,
            trusted: tuple, parity_ok: bool, n_calib: int, threads: int) -> RecalibrationResult:
    reference = new_dir / "model_fp32.onnx"
    cand = score(reference, new_dir / "model_int8.onnx", held, threads)
    cur = score(reference, cur_dir / "model_int8.onnx", held, threads)
    tx = torch.from_numpy(trusted[0])
    t_cand = score(reference, new_dir / "model_int8.onnx", tx, threads, trusted[1])
    t_cur = score(reference, cur_dir / "model_int8.onnx", tx, threads, trusted[1])
    accepted, reason = is_better(cand, cur)
    t_ok, t_reason = trusted_ok(t_cand, t_cur)
    if not t_ok:
        accepted, reason = False, f"{t_reason} ({reason})"
    elif accepted:
        reason = f"{reason}; {t_reason}"
    if not parity_ok:
        accepted, reason = False, "parity check failed: ONNX Runtime and the simulation disagree"
    trusted_info = {"rows": int(tx.shape[0]), "source": trusted[2], "labels": trusted[1] is not None,
                    "candidate": t_cand, "current": t_cur}
    return RecalibrationResult(version, current, accepted, reason, new_dir, n_calib, int(held.shape[0]), parity_ok,
                               cand, cur, trusted_info)


def _finish(model_dir: Path, outcome: RecalibrationResult, keep: int) -> None:
    """Record the outcome; activate an accepted version, remove a rejected one; prune old versions."""
    record = outcome.to_dict()
    append_history(model_dir, record)
    if outcome.accepted:
        write_json_atomic(outcome.folder / "recalibration.json", record)
        set_active_version(model_dir, outcome.version)
        prune_versions(model_dir, keep)
    else:
        remove_version(model_dir, outcome.version)
    log.warning("re-calibration %s from %s: %s", outcome.version, outcome.previous, outcome.reason)
