"""Sensitivity sweeps (budget, progress, custom metric) and the gradient score."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.analysis import analyze_converted
from lowbit.analysis.sensitivity import NOT_MEASURED


def test_sweeps_measure_everything_with_enough_budget(qdigits):
    q, calib = qdigits
    calls = []
    res = analyze_converted(q, calib[:32], budget_seconds=60, progress=lambda d, t, s: calls.append((d, t)))
    for r in res.rows:
        assert isinstance(r["metric_one_quantized"], float) and isinstance(r["metric_one_float"], float)
        assert r["sensitivity"] == pytest.approx(1.0 - r["metric_one_quantized"])
        if r["type"] in ("Conv2d", "Linear"):
            assert isinstance(r["metric_weight_only"], float) and isinstance(r["metric_input_only"], float)
        else:
            assert r["metric_weight_only"] == NOT_MEASURED
    assert calls and calls[-1][0] == calls[-1][1]


def test_broken_layer_is_most_sensitive_with_custom_metric(qdigits):
    q, calib = qdigits
    b = copy.deepcopy(q)
    b.lowbit_info = q.lowbit_info
    wq = b.get_submodule("down_conv").weight_quantizer
    wq.set_qparams(wq.scale * 100, wq.zero_point)

    def neg_mse(ref, out):
        return -float((ref - out).pow(2).mean())

    res = analyze_converted(b, calib[:32], metric_fn=neg_mse, budget_seconds=60)
    worst = max(res.rows, key=lambda r: r["sensitivity"])
    assert worst["layer"] == "down_conv"
    assert worst["recovery"] > 0


def test_partial_budget_marks_rest_not_measured(qdigits):
    q, calib = qdigits
    res = analyze_converted(q, calib[:32], budget_seconds=1e-9)
    values = [r["metric_one_quantized"] for r in res.rows]
    assert NOT_MEASURED in values


def test_gradient_score_flags_scaled_layer(digits):
    model, calib, _, _ = digits
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.fc.weight.mul_(0.1)  # a relative score: every other layer's gradient shrinks 10x
    q = lowbit.quantize(m, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    res = analyze_converted(q, calib[:64], budget_seconds=0)
    row = res.row("fc")
    assert row["grad_score"] > 2 and row["grad_flag"] and "grad_2x" in row["flags"]
    base = analyze_converted(lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False),
                             calib[:64], budget_seconds=0)
    assert not base.row("fc")["grad_flag"]
    assert sum(r["grad_score"] for r in res.rows if r["grad_score"] is not None) == pytest.approx(
        sum(1 for r in res.rows if r["grad_score"] is not None))
