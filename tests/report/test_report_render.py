"""report.render: JSON with required keys and non-finite floats, Markdown table."""

from __future__ import annotations

import json
import math

import pytest

from lowbit.report.render import REQUIRED_KEYS, summary_rows, to_json, to_markdown


def _report(**over):
    r = {
        "model": "digits-cnn", "recipe": "int8", "calibrator": "percentile", "target": "onnxruntime",
        "metric_name": "accuracy", "metric_fp32": 0.99332, "metric_int8": 0.98886, "top1_agreement": 0.9955,
        "kl": 0.000239, "sqnr_db": 32.4886, "cosine": 0.99972, "mse": 0.00671,
        "size_bytes_fp32": 40913, "size_bytes_int8": 20215,
        "latency_ms_fp32_b1": 0.04, "latency_ms_int8_b1": 0.02, "latency_ms_fp32_b32": 0.3, "latency_ms_int8_b32": 0.2,
        "parity_ok": True,
        "parity": {"ok": True, "fraction_within_step": 1.0, "max_abs_diff": 0.0137, "step": 0.0706, "elements": 4490},
        "float_layers": [{"layer": "fc", "reason": "kept in float by a recipe rule"}],
        "eval_samples": 449, "threads": 2, "int8_kernels": 6, "executed_op_types": {"QLinearConv": 4, "Gemm": 1},
        "metric_int8_simulated": 0.98886,
    }
    r.update(over)
    return r


def test_required_keys_match_the_documented_set():
    assert set(REQUIRED_KEYS) == {
        "metric_fp32", "metric_int8", "top1_agreement", "kl", "sqnr_db", "size_bytes_fp32", "size_bytes_int8",
        "latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b32", "latency_ms_int8_b32", "parity_ok",
        "float_layers",
    }


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_to_json_refuses_a_missing_key(key):
    r = _report()
    del r[key]
    with pytest.raises(ValueError, match=f"report is missing key '{key}'"):
        to_json(r)


def test_to_json_round_trips_and_serialises_non_finite():
    r = _report(sqnr_db=math.inf, kl=math.nan, extra={"a": [1.0, -math.inf, {"b": math.nan}]})
    text = to_json(r)
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    back = json.loads(text)
    assert back["sqnr_db"] == "inf" and back["kl"] == "nan"
    assert back["extra"] == {"a": [1.0, "-inf", {"b": "nan"}]}
    assert back["metric_fp32"] == 0.99332 and back["size_bytes_int8"] == 20215 and back["parity_ok"] is True
    assert back["float_layers"] == r["float_layers"]
    assert text.endswith("\n")
    assert r["sqnr_db"] == math.inf  # input untouched


def test_to_markdown_contains_every_table_row():
    r = _report()
    md = to_markdown(r)
    assert md.startswith("# lowbit INT8 report: digits-cnn\n")
    assert "| measure | FP32 | INT8 |" in md
    rows = summary_rows(r)
    assert len(rows) == 9
    for a, b, c in rows:
        assert f"| {a} | {b} | {c} |" in md
    assert "| metric (accuracy) | 0.9933 | 0.9889 |" in md
    assert "| top-1 agreement with FP32 | 1.0000 | 0.9955 |" in md
    assert "| model size, bytes | 40,913 | 20,215 (2.02x smaller) |" in md
    assert "| latency batch 1, ms (median) | 0.04 | 0.02 (2.00x) |" in md
    assert "| latency batch 32, ms (median) | 0.30 | 0.20 (1.50x) |" in md
    assert "| output SQNR, dB (higher is better) | ∞ | 32.49 |" in md
    assert "OK: 100.000% of 4,490 output elements" in md
    assert "- `fc`: kept in float by a recipe rule" in md
    assert "QLinearConv x4" in md


def test_to_markdown_failed_parity_and_no_float_layers():
    md = to_markdown(_report(parity_ok=False, float_layers=[], sqnr_db=math.inf))
    assert "FAILED:" in md and md.rstrip().endswith("None.")
    assert "| output SQNR, dB (higher is better) | ∞ | inf |" in md
