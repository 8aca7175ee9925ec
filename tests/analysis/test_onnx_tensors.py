"""Layer-wise analysis of the exported INT8 model on ONNX Runtime (digits-cnn): rows, figures, streaming, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import onnx
import pytest
import torch

import lowbit
from lowbit.analysis import metrics
from lowbit.cli.main import main
from lowbit.analysis.onnx_tensors import (OUTPUT_CONSUMER, RunningError, analyze_onnx, first_nonfinite,
                                          quantized_tensors, to_json, worst_tensors)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    model, calib, eval_x, _ = digits
    q = lowbit.quantize(model, calib[:64], lowbit.preset("int8"), calib[:1], show_progress=False)
    out = tmp_path_factory.mktemp("onnx_tensors")
    fp32 = lowbit.export_onnx(q, calib[:1], out / "model_fp32.onnx", float_model=True, check_parity=False)
    int8 = lowbit.export_onnx(q, calib[:1], out / "model_int8.onnx", check_parity=False)
    x = eval_x[:64]
    return q, fp32, int8, x, analyze_onnx(fp32, int8, x, batch_size=64)


def _activation_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["consumer"] != OUTPUT_CONSUMER]


def test_one_row_per_activation_quantizer(exported):
    q, fp32, int8, x, rows = exported
    n_act = sum(1 for n, m in q.named_modules()
                if n.startswith("lowbit_act.") and isinstance(m, lowbit.nn.TensorQuantizer) and m.spec is not None)
    acts = _activation_rows(rows)
    assert len(acts) == n_act
    assert [r["tensor"] for r in rows[len(acts):]] == ["output"]
    assert acts[0]["tensor"] == "input" and acts[0]["consumer"].startswith("Conv ")
    fp_tensors = {o for n in onnx.load(str(fp32)).graph.node for o in n.output} | {"input"}
    assert {r["tensor"] for r in acts} <= fp_tensors
    for r in rows:
        assert set(r) == {"tensor", "consumer", "sqnr_db", "cosine", "mse", "saturation_rate", "nonfinite", "elements"}
        assert r["consumer"] and not r["nonfinite"]
        assert r["elements"] > 0 and r["elements"] % x.shape[0] == 0
    assert first_nonfinite(rows) is None


def test_sqnr_finite_and_error_accumulates(exported):
    *_, rows = exported
    acts = _activation_rows(rows)
    for r in rows:
        assert math.isfinite(r["sqnr_db"]) and r["sqnr_db"] > 10
        assert 0.99 < r["cosine"] <= 1.0 + 1e-12 and r["mse"] >= 0
    for r in acts:
        assert 0.0 <= r["saturation_rate"] <= 1.0
    assert acts[-1]["sqnr_db"] < acts[0]["sqnr_db"]
    assert worst_tensors(rows, 1)[0]["sqnr_db"] == min(r["sqnr_db"] for r in rows)


def test_input_row_matches_numpy_reference(exported):
    _, _, int8, x, rows = exported
    qt = quantized_tensors(onnx.load(str(int8)))[0]
    assert qt.tensor == "input" and qt.zero_point.dtype == np.uint8
    ref = x.numpy().astype(np.float32)
    s, zp = np.float32(qt.scale), int(qt.zero_point)
    codes = np.clip(np.rint(ref / s) + zp, 0, 255).astype(np.uint8)
    out = (codes.astype(np.float64) - zp) * float(s)
    r = rows[0]
    assert r["sqnr_db"] == pytest.approx(metrics.sqnr_db(torch.from_numpy(ref), torch.from_numpy(out)), rel=1e-9)
    assert r["cosine"] == pytest.approx(metrics.cosine(torch.from_numpy(ref), torch.from_numpy(out)), rel=1e-9)
    assert r["mse"] == pytest.approx(metrics.mse(torch.from_numpy(ref), torch.from_numpy(out)), rel=1e-9)
    clipped = ((codes == 0) | (codes == 255)) & (codes != zp)
    assert r["saturation_rate"] == pytest.approx(clipped.mean(), abs=1e-12)
    assert r["elements"] == ref.size


def test_streaming_over_batches_equals_one_batch(exported):
    _, fp32, int8, x, rows = exported
    streamed = analyze_onnx(fp32, int8, x, batch_size=32)
    assert [r["tensor"] for r in streamed] == [r["tensor"] for r in rows]
    for a, b in zip(streamed, rows):
        for key in ("sqnr_db", "cosine", "mse", "saturation_rate"):
            if b[key] is None:  # the graph output has no codes
                assert a[key] is None and b["consumer"] == OUTPUT_CONSUMER
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-15), (a["tensor"], key)
        assert a["elements"] == b["elements"]


def test_nonfinite_input_is_named_first(exported):
    _, fp32, int8, x, _ = exported
    bad = x[:4].clone()
    bad[1, 0, 0, 0] = float("nan")
    rows = analyze_onnx(fp32, int8, bad, batch_size=4)
    assert rows[0]["nonfinite"] and first_nonfinite(rows) == "input"
    assert math.isnan(rows[0]["sqnr_db"])
    assert to_json(rows)[0]["sqnr_db"] == "nan"


def test_running_error_matches_metrics():
    rng = np.random.default_rng(0)
    ref, out = rng.normal(size=1000), rng.normal(size=1000)
    err = RunningError()
    err.update(ref[:300], out[:300])
    err.update(ref[300:], out[300:])
    tr, to = torch.from_numpy(ref), torch.from_numpy(out)
    assert err.sqnr_db() == pytest.approx(metrics.sqnr_db(tr, to), rel=1e-12)
    assert err.cosine() == pytest.approx(metrics.cosine(tr, to), rel=1e-12)
    assert err.mse() == pytest.approx(metrics.mse(tr, to), rel=1e-12)
    same = RunningError()
    same.update(ref, ref)
    assert same.sqnr_db() == math.inf and same.cosine() == pytest.approx(1.0)


def test_cli_engine_onnxruntime_writes_file(tmp_path):
    out = tmp_path / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["analyze", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--budget-seconds", "0",
                   "--n-calib", "32", "--n-eval", "48", "--engine", "onnxruntime"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.html", "analysis.json", "analysis_onnxruntime.json"]
    data = json.loads((out / "analysis_onnxruntime.json").read_text())
    assert data["engine"] == "onnxruntime" and data["samples"] == 48 and data["model"] == "digits-cnn"
    assert data["rows"][0]["tensor"] == "input" and data["first_nonfinite_tensor"] is None
    stdout = buf.getvalue()
    assert "worst tensors by SQNR" in stdout and "analysis_onnxruntime.json" in stdout
    worst = worst_tensors([r for r in data["rows"]], 1)[0]
    assert worst["tensor"][:20] in stdout
