"""End to end: analyze a float model, a deliberately broken layer, JSON output."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lowbit
from lowbit.analysis import AnalysisResult, analyze, analyze_converted

ROW_KEYS = {"layer", "type", "sqnr_db_isolated", "sqnr_db_cumulative", "cosine_isolated", "cosine_cumulative",
            "mse_isolated", "kl", "hist_overlap", "clip_mse", "round_mse", "saturation_rate", "sensitivity",
            "verdict", "sqnr_db_weight", "sqnr_db_input", "outlier_rate", "flags", "fix_rule"}


def _broken(q, layer, factor):
    b = copy.deepcopy(q)
    b.lowbit_info = q.lowbit_info
    wq = b.get_submodule(layer).weight_quantizer
    wq.set_qparams(wq.scale * factor, wq.zero_point)
    return b


def test_analyze_float_model_and_json(digits):
    model, calib, _, _ = digits
    res = analyze(model, calib[:64], lowbit.preset("int8"), calib[:1], budget_seconds=1.0)
    assert isinstance(res, AnalysisResult)
    assert res.seconds > 0 and 0.0 <= res.metric_fp32_vs_quant <= 1.0
    for row in res.rows:
        assert ROW_KEYS <= set(row)
    data = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert set(data) == {"rows", "histograms", "first_nonfinite_layer", "seconds", "metric_fp32_vs_quant"}
    assert 1 <= len(data["histograms"]) <= 5
    for h in data["histograms"].values():
        assert len(h["edges"]) == len(h["fp32"]) + 1 == len(h["quant"]) + 1 == len(h["error"]) + 1
        assert sum(h["fp32"]) == sum(h["quant"]) > 0


@pytest.mark.parametrize("factor, cause", [(100.0, "rounding"), (0.01, "clipping")])
def test_broken_weight_scale_ranked_worst_with_right_cause(qdigits, factor, cause):
    q, calib = qdigits
    res = analyze_converted(_broken(q, "res_conv2", factor), calib[:64], budget_seconds=0)
    worst = min(res.rows, key=lambda r: r["sqnr_db_isolated"])
    assert worst["layer"] == "res_conv2"
    assert "low_sqnr" in worst["flags"]
    assert worst["verdict"].startswith(cause) and "weights" in worst["verdict"]
    assert worst["fix_rule"] and "res_conv2" in worst["fix_rule"]
    assert worst["sqnr_db_weight"] < worst["sqnr_db_input"]
    assert worst["layer"] in res.histograms


def test_clipped_input_gets_activation_clipping_verdict(qdigits):
    q, calib = qdigits
    b = copy.deepcopy(q)
    b.lowbit_info = q.lowbit_info
    aq = b.get_submodule("lowbit_act.down_conv_q")
    aq.set_qparams(aq.scale * 0.05, aq.zero_point)
    res = analyze_converted(b, calib[:64], budget_seconds=0)
    row = res.row("down_conv")
    assert row["clip_mse"] > row["round_mse"] and row["saturation_rate"] > 0.05
    assert row["verdict"] == "clipping (activations)"
    assert "calibrator: mse" in row["fix_rule"]


def test_budget_zero_marks_not_measured(qdigits):
    q, calib = qdigits
    res = analyze_converted(q, calib[:32], budget_seconds=0)
    assert all(r["sensitivity"] == "not measured" for r in res.rows)
    json.dumps(res.to_json())


def test_original_model_untouched(qdigits):
    q, calib = qdigits
    before = {n: m.enabled for n, m in q.named_modules() if hasattr(m, "enabled")}
    with torch.no_grad():
        ref = q(calib[:8])
    analyze_converted(q, calib[:16], budget_seconds=0)
    assert before == {n: m.enabled for n, m in q.named_modules() if hasattr(m, "enabled")}
    with torch.no_grad():
        assert torch.equal(q(calib[:8]), ref)
