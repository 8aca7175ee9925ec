"""lowbit quantize --recipe litert-int8 end to end (in-process), and the one-line answer without the extra."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import lowbit
from lowbit.cli.main import main
from lowbit.export import litert as litert_export
from lowbit.report.litert import HEAD_REASON

FILES = ["model_fp32.tflite", "model_int8.tflite", "recipe.yaml", "report.json", "report.md", "trusted_inputs.npy",
         "trusted_labels.npy"]
ONNX_KEYS = ("top1_agreement", "kl", "parity_ok", "latency_ms_fp32_b1", "latency_ms_int8_b1", "size_bytes_fp32",
             "size_bytes_int8", "float_layers")


def _needs_litert():
    pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")
    pytest.importorskip("litert_torch", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")


@pytest.fixture(scope="module")
def litert_run(tmp_path_factory):
    _needs_litert()
    out = tmp_path_factory.mktemp("cli-litert") / "digits-litert"
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", "litert-int8", "--out", str(out),
               "--repeats", "5"])
    return rc, out


def test_litert_run_writes_tflite_files_and_onnx_report_keys(litert_run):
    rc, out = litert_run
    assert rc == 0
    assert sorted(os.listdir(out)) == FILES
    assert lowbit.load_recipe(out / "recipe.yaml") == lowbit.preset("litert-int8")
    report = json.loads((out / "report.json").read_text())
    for key in ONNX_KEYS:
        assert key in report, key
    assert report["target"] == "litert" and report["io"] == "float"
    assert report["parity_ok"] is True and report["parity"]["fraction_within_step"] >= 0.999
    # default head=float: every compute op int8 but the classifier, listed with its reason
    assert report["head"] == "float" and report["litert_ops_int8"]["float_ops"] == {"FULLY_CONNECTED": 1}
    assert [f["op"] for f in report["float_layers"]] == ["FULLY_CONNECTED"]
    assert report["float_layers"][0]["reason"] == HEAD_REASON
    assert report["int8_coverage"] == 6 / 7 and report["extra_layout_ops"] == {}
    assert report["litert_ops_int8"]["int8_ops"]["CONV_2D"] >= 1
    assert report["metric_int8"] >= report["metric_fp32"] - 0.01
    assert report["size_bytes_int8"] < report["size_bytes_fp32"] / 2
    assert "LiteRT interpreter" in (out / "report.md").read_text()


def test_litert_int8_io(tmp_path):
    _needs_litert()
    from lowbit.export.litert_runtime import make_interpreter

    out = tmp_path / "io8"
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", "litert-int8", "--io", "int8",
               "--out", str(out), "--repeats", "3", "--n-eval", "64"])
    assert rc == 0
    interp = make_interpreter(out / "model_int8.tflite")
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    report = json.loads((out / "report.json").read_text())
    assert report["parity_ok"] is True and report["head"] == "int8"
    assert report["int8_coverage"] == 1.0 and report["float_layers"] == []


def test_existing_dir_is_not_overwritten_without_force(litert_run, capsys):
    _, out = litert_run
    before = (out / "report.json").read_text()
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", "litert-int8", "--out", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before


def test_without_the_extra_one_line_says_how_to_install(tmp_path, monkeypatch, capsys):
    real = litert_export.importlib.import_module

    def missing(name, *args):
        if name.startswith(("ai_edge_litert", "litert_torch")):
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(litert_export.importlib, "import_module", missing)
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", "litert-int8",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "pip install 'lowbit[litert]'" in err[0]
    assert not (tmp_path / "x").exists()


def test_io_int8_needs_the_litert_target(tmp_path, capsys):
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--io", "int8", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--io int8" in capsys.readouterr().err
