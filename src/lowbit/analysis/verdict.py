"""Flags, likely cause and a pasteable recipe fix for each analysed site.

Flags (a site is *flagged* when it has any):

* ``low_sqnr``: isolated SQNR below ``LOW_SQNR_DB`` or ``RELATIVE_DB`` below the median isolated SQNR;
* ``hist_overlap``: input histogram overlap below ``MIN_OVERLAP`` (0.8);
* ``saturation``: more than ``MAX_SATURATION`` of the input codes at qmin / qmax;
* ``outliers``: more than ``MAX_OUTLIERS`` of the FP32 input beyond ±4σ;
* ``sensitive``: the task metric drops by more than ``MAX_DROP`` with this site alone quantized;
* ``grad_2x``: gradient score or saliency above 2 (see ``sensitivity``);
* ``nonfinite``: NaN / Inf in this site's output.

Cause: the dominant quantizer is the one whose isolated SQNR is lower (weight-only vs input-only); its
error is split into clipping (values outside the range) and rounding; then

* weight, rounding, per-tensor, depthwise conv → ``per-tensor weights on depthwise conv`` → per_channel;
* weight, rounding, per-tensor → ``rounding`` → per_channel;  weight, clipping → ``clipping`` → minmax;
* weight, rounding, already per-channel → ``rounding`` → the recipe-level passes AdaRound + bias correction
  (``passes: [adaround, bias_correction]``), or keep the layer float if that is not enough;
* input, clipping → ``clipping`` → ``calibrator: mse``; input with many outliers → ``outliers`` → float;
* input, symmetric signed grid on one-sided data → ``asymmetric range`` → ``symmetric: false``;
* input, rounding → ``rounding`` → keep the site float.
"""

from __future__ import annotations

import math
import statistics

from lowbit.core import PerTensor

LOW_SQNR_DB = 20.0
RELATIVE_DB = 10.0
MIN_OVERLAP = 0.8
MAX_SATURATION = 0.05
MAX_OUTLIERS = 0.01
MAX_DROP = 0.01
ASYMMETRY = 0.4


def _num(v) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) else None


def flags_of(row: dict, median_db: float | None) -> list[str]:
    """The flags of the module doc for one result row."""
    flags = []
    iso = _num(row.get("sqnr_db_isolated"))
    if iso is not None and (iso < LOW_SQNR_DB or (median_db is not None and iso < median_db - RELATIVE_DB)):
        flags.append("low_sqnr")
    checks = (("hist_overlap", lambda v: v < MIN_OVERLAP), ("saturation_rate", lambda v: v > MAX_SATURATION),
              ("outlier_rate", lambda v: v > MAX_OUTLIERS), ("sensitivity", lambda v: v > MAX_DROP))
    names = {"saturation_rate": "saturation", "outlier_rate": "outliers", "sensitivity": "sensitive"}
    for key, bad in checks:
        v = _num(row.get(key))
        if v is not None and bad(v):
            flags.append(names.get(key, key))
    if row.get("grad_flag"):
        flags.append("grad_2x")
    if row.get("nonfinite"):
        flags.append("nonfinite")
    return flags


def median_isolated(rows: list[dict]) -> float | None:
    """Median of the finite isolated SQNRs."""
    vals = [v for v in (_num(r.get("sqnr_db_isolated")) for r in rows) if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _weight_dominant(row: dict) -> bool:
    w, a = _num(row.get("sqnr_db_weight")), _num(row.get("sqnr_db_input"))
    if w is None:
        return False
    return a is None or w <= a


def _yaml_rule(pattern: str, body: str) -> str:
    return f'- pattern: "{pattern}"\n  {body}'


def _weight_verdict(row: dict, spec) -> tuple[str, str]:
    name = row["layer"]
    clip, rnd = _num(row.get("weight_clip_mse")) or 0.0, _num(row.get("weight_round_mse")) or 0.0
    if clip > rnd:
        return ("clipping (weights)", _yaml_rule(name, "weight: {calibrator: minmax}"))
    per_tensor = spec is not None and isinstance(spec.granularity, PerTensor)
    if per_tensor and row.get("depthwise"):
        return ("per-tensor weights on depthwise conv", _yaml_rule(name, "weight: {granularity: per_channel}"))
    if per_tensor:
        return ("rounding (per-tensor weights)", _yaml_rule(name, "weight: {granularity: per_channel}"))
    return ("rounding (weights)", "passes: [adaround, bias_correction]  # recipe level; if not enough:\n"
            + _yaml_rule(name, "float: true"))


def _input_verdict(row: dict) -> tuple[str, str]:
    name = row["layer"]
    clip, rnd = _num(row.get("clip_mse")) or 0.0, _num(row.get("round_mse")) or 0.0
    if (_num(row.get("asymmetry")) or 0.0) > ASYMMETRY:
        return ("asymmetric range", _yaml_rule(name, "input: {symmetric: false}"))
    if clip > rnd:
        return ("clipping (activations)", _yaml_rule(name, "input: {calibrator: mse}"))
    if (_num(row.get("outlier_rate")) or 0.0) > MAX_OUTLIERS:
        return ("outliers (activations)", _yaml_rule(name, "float: true"))
    return ("rounding (activations)", _yaml_rule(name, "float: true"))


def verdict(row: dict, weight_spec=None) -> tuple[str | None, str | None]:
    """``(cause, fix_rule)`` for a flagged row, ``(None, None)`` when it has no flag.

    Args:
        weight_spec: the site's weight QuantSpec (granularity decides per-tensor vs per-channel fixes).
    """
    if not row.get("flags"):
        return None, None
    if row["flags"] == ["grad_2x"]:
        return ("high gradient score: check its sensitivity", None)
    if "nonfinite" in row["flags"]:
        return ("non-finite values", _yaml_rule(row["layer"], "float: true"))
    if _weight_dominant(row):
        return _weight_verdict(row, weight_spec)
    if _num(row.get("sqnr_db_input")) is None and _num(row.get("clip_mse")) is None:
        return ("unknown", _yaml_rule(row["layer"], "float: true"))
    return _input_verdict(row)
