"""lowbit quantize end to end (in-process): the files written, the report, --force, tensorrt, folders, --eval."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import lowbit
from lowbit.cli.main import main
from lowbit.export.runtime import make_session, run_session
from lowbit.export.trt_cache import parse_cache
from lowbit.report.render import REQUIRED_KEYS

HERE = Path(__file__).parent
FILES = ["model_fp32.onnx", "model_int8.onnx", "recipe.yaml", "report.json", "report.md", "trusted_inputs.npy",
         "trusted_labels.npy"]


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One full digits-cnn run over an existing folder with --force (replaces its stale content)."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "digits-int8"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--force", "--repeats", "2"])
    return rc, root, out


def test_digits_writes_exactly_the_promised_files(digits_run):
    rc, root, out = digits_run
    assert rc == 0
    assert sorted(os.listdir(out)) == FILES  # stale content replaced
    assert sorted(p.name for p in root.iterdir()) == ["digits-int8"]  # no staging / backup folders left
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        onnx.checker.check_model(onnx.load(str(out / name)))
    assert lowbit.load_recipe(out / "recipe.yaml") == lowbit.preset("int8")


def test_digits_report_has_every_key_and_int8_holds_accuracy(digits_run, digits):
    _, _, out = digits_run
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert report["parity_ok"] is True
    assert report["float_layers"] == []
    assert report["metric_name"] == "accuracy" and report["eval_samples"] == 449
    assert abs(report["metric_int8"] - report["metric_fp32"]) <= 0.003
    assert report["metric_fp32"] > 0.95
    assert report["size_bytes_fp32"] == (out / "model_fp32.onnx").stat().st_size
    assert report["size_bytes_int8"] == (out / "model_int8.onnx").stat().st_size
    assert report["size_bytes_int8"] < 0.6 * report["size_bytes_fp32"]
    for key in ("latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b32", "latency_ms_int8_b32"):
        assert isinstance(report[key], float) and report[key] > 0
    assert report["executed_op_types"].get("QLinearConv", 0) == 4
    # the figures are measured on ONNX Runtime: recompute them independently
    model, _, x_eval, y_eval = digits
    fp32 = run_session(make_session(out / "model_fp32.onnx"), x_eval)
    int8 = run_session(make_session(out / "model_int8.onnx"), x_eval)
    assert report["metric_fp32"] == pytest.approx(float((fp32.argmax(1) == y_eval).double().mean()), abs=1e-12)
    assert report["metric_int8"] == pytest.approx(float((int8.argmax(1) == y_eval).double().mean()), abs=1e-12)
    assert report["top1_agreement"] == pytest.approx(float((fp32.argmax(1) == int8.argmax(1)).double().mean()))
    with torch.no_grad():
        torch.testing.assert_close(fp32, model(x_eval), rtol=0, atol=1e-4)
    md = (out / "report.md").read_text()
    assert "| metric (accuracy) |" in md and "## Parity: PyTorch simulation vs ONNX Runtime" in md


def test_tensorrt_recipe_writes_calibration_cache(tmp_path):
    out = tmp_path / "trt"
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", "tensorrt-int8", "--out", str(out),
               "--n-calib", "32", "--n-eval", "32", "--repeats", "1"])
    assert rc == 0
    assert sorted(os.listdir(out)) == sorted([*FILES, "calibration.cache"])
    scales = parse_cache((out / "calibration.cache").read_text())
    fp = onnx.load(str(out / "model_fp32.onnx"))
    names = {i.name for i in fp.graph.input} | {o for n in fp.graph.node for o in n.output}
    assert scales and set(scales) <= names
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "tensorrt" and report["eval_samples"] == 32
    assert lowbit.load_recipe(out / "recipe.yaml").target == "tensorrt"


def _images(folder: Path, n_good: int, n_bad: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    for i in range(n_bad):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff truncated")
    (folder / "readme.txt").write_text("not an image")


def test_folder_with_some_corrupt_files_skips_and_counts_them(tmp_path, caplog):
    folder = tmp_path / "pics"
    _images(folder, 6, 2)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        rc = main(["quantize", "--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8", "--data", str(folder),
                   "--calibrator", "minmax", "--out", str(out), "--repeats", "1"])
    assert rc == 0
    assert any("skipped 3 of 9 files" in r.getMessage() and str(folder) in r.getMessage() for r in caplog.records)
    report = json.loads((out / "report.json").read_text())
    assert report["eval_samples"] == 6 and report["calibrator"] == "minmax"
    assert report["metric_name"] == "top1_agreement"
    assert lowbit.load_recipe(out / "recipe.yaml").default_input.calibrator == "minmax"
    assert sorted(os.listdir(out)) == [f for f in FILES if f != "trusted_labels.npy"]  # images without labels


def test_eval_function_is_used_for_the_metric(tmp_path):
    from lowbit_cli_models import EVAL_INPUTS

    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32))
    out = tmp_path / "out"
    rc = main(["quantize", "--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8", "--data", str(data),
               "--eval", "lowbit_cli_models:first_logit_mean", "--out", str(out), "--repeats", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric_name"] == "lowbit_cli_models:first_logit_mean"
    fp32 = run_session(make_session(out / "model_fp32.onnx"), EVAL_INPUTS)
    int8 = run_session(make_session(out / "model_int8.onnx"), EVAL_INPUTS)
    assert report["metric_fp32"] == pytest.approx(float(fp32[:, 0].double().mean()), rel=1e-9, abs=1e-12)
    assert report["metric_int8"] == pytest.approx(float(int8[:, 0].double().mean()), rel=1e-9, abs=1e-12)
    assert report["metric_fp32"] != report["metric_int8"]
    assert report["eval_samples"] == 16


@pytest.mark.slow
def test_efficientnet_lite0_demo_sized_run(tmp_path):
    out = tmp_path / "effnet"
    rc = main(["quantize", "--model", "efficientnet-lite0", "--data", "photos", "--out", str(out),
               "--n-calib", "4", "--n-eval", "2", "--repeats", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(os.listdir(out)) == [f for f in FILES if f != "trusted_labels.npy"]  # photos have no labels
    assert report["metric_name"] == "top1_agreement" and report["eval_samples"] == 2
    assert report["parity_ok"] is True and report["float_layers"] == []
    assert report["int8_kernels"] > 20 and report["executed_op_types"].get("QLinearConv", 0) > 20
    assert report["size_bytes_int8"] < 0.4 * report["size_bytes_fp32"]
