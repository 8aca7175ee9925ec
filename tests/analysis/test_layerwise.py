"""Layer-wise errors against a naive reference that materialises every activation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lowbit
from lowbit.analysis import analyze_converted
from lowbit.analysis.layerwise import ErrorStats, unlink_engine
from lowbit.analysis.metrics import cosine, mse, sqnr_db
from lowbit.nn import QuantLayerMixin


def _module_sites(q):
    info = q.lowbit_info
    return [n for n in info.layer_kinds if n in dict(q.named_modules())]


def _naive_outputs(q, x, on):
    """Output of every module site with exactly the quantizers ``on`` (by name) enabled."""
    outs, handles = {}, []
    for name in _module_sites(q):
        mod = q.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: outs.__setitem__(name, o.detach().clone())))
    qs = {n: m for n, m in lowbit.transforms.prepare.quantizers(q) if m.is_active}
    saved = {n: m.enabled for n, m in qs.items()}
    try:
        for n, m in qs.items():
            m.enabled = n in on
        with torch.no_grad():
            q(x)
    finally:
        for n, m in qs.items():
            m.enabled = saved[n]
        for h in handles:
            h.remove()
    return outs


def _site_quantizers(q, name):
    names = list(q.lowbit_info.layer_inputs.get(name, []))
    if isinstance(dict(q.named_modules()).get(name), QuantLayerMixin):
        names.append(f"{name}.weight_quantizer")
    return names


def test_isolated_and_cumulative_match_naive_reference(qdigits):
    q, calib = qdigits
    x = calib[:16]
    res = analyze_converted(q, x, budget_seconds=0)
    ref_model = copy.deepcopy(q)
    ref_model.lowbit_info = q.lowbit_info
    unlink_engine(ref_model)
    fp32 = _naive_outputs(ref_model, x, set())
    order = [r["layer"] for r in res.rows]
    for name in _module_sites(ref_model):
        iso = _naive_outputs(ref_model, x, set(_site_quantizers(ref_model, name)))[name]
        upto = order[: order.index(name) + 1]
        cum_on = {qn for site in upto for qn in _site_quantizers(ref_model, site)}
        cum = _naive_outputs(ref_model, x, cum_on)[name]
        row = res.row(name)
        assert row["sqnr_db_isolated"] == pytest.approx(sqnr_db(fp32[name], iso), rel=1e-6)
        assert row["sqnr_db_cumulative"] == pytest.approx(sqnr_db(fp32[name], cum), rel=1e-6), name
        assert row["cosine_isolated"] == pytest.approx(cosine(fp32[name], iso), rel=1e-6)
        assert row["cosine_cumulative"] == pytest.approx(cosine(fp32[name], cum), rel=1e-6)
        assert row["mse_isolated"] == pytest.approx(mse(fp32[name], iso), rel=1e-6)


def test_streaming_equals_one_big_batch(qdigits):
    q, calib = qdigits
    x = calib[:96]
    small = analyze_converted(q, x, budget_seconds=0, batch_size=7)
    big = analyze_converted(q, x, budget_seconds=0, batch_size=96)
    keys = ("sqnr_db_isolated", "sqnr_db_cumulative", "cosine_isolated", "cosine_cumulative", "mse_isolated",
            "sqnr_db_weight", "sqnr_db_input", "kl", "hist_overlap", "clip_mse", "round_mse", "saturation_rate",
            "outlier_rate")
    assert [r["layer"] for r in small.rows] == [r["layer"] for r in big.rows]
    for a, b in zip(small.rows, big.rows):
        for k in keys:
            if a[k] is None:
                assert b[k] is None
            else:
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-12), (a["layer"], k)
    assert small.histograms.keys() == big.histograms.keys()


def test_rows_cover_every_site_in_execution_order(qdigits):
    q, calib = qdigits
    res = analyze_converted(q, calib[:32], budget_seconds=0)
    assert [r["layer"] for r in res.rows] == ["conv1", "res_conv1", "res_conv2", "add", "down_conv", "pool", "fc"]
    first = res.rows[0]
    assert first["sqnr_db_isolated"] == pytest.approx(first["sqnr_db_cumulative"], rel=1e-12)
    for r in res.rows:
        assert r["sqnr_db_cumulative"] <= r["sqnr_db_isolated"] + 3.0  # errors add up along the network
        assert 0.0 <= r["hist_overlap"] <= 1.0
    assert res.first_nonfinite_layer is None


def test_nan_reports_first_layer(qdigits):
    q, calib = qdigits
    broken = copy.deepcopy(q)
    broken.lowbit_info = q.lowbit_info
    broken.get_submodule("res_conv2").register_forward_hook(lambda m, a, o: o * float("nan"))
    res = analyze_converted(broken, calib[:32], budget_seconds=0)
    assert res.first_nonfinite_layer == "res_conv2"
    assert "nonfinite" in res.row("res_conv2")["flags"]
    assert res.row("res_conv1")["nonfinite"] == 0


def test_error_stats_limits():
    st = ErrorStats()
    assert st.sqnr_db() is None
    x = torch.randn(10)
    st.update(x, x)
    assert st.sqnr_db() == math.inf and st.cosine() == pytest.approx(1.0) and st.mse() == 0.0
