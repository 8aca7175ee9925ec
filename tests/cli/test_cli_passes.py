"""lowbit quantize --passes: the passes run, the report and recipe say so, bad names fail in one line."""

from __future__ import annotations

import json

import yaml

from lowbit.cli.main import main, parse_passes


def test_parse_passes():
    assert parse_passes("gptq, bias_correction") == ["gptq", "bias_correction"]
    assert parse_passes("none") == []


def test_quantize_with_passes_writes_them_into_report_and_recipe(tmp_path):
    out = tmp_path / "out"
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--passes", "bias_correction,gptq",
               "--pass-batches", "2", "--out", str(out), "--repeats", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["passes"] == ["gptq", "bias_correction"]  # the order they ran in
    assert set(report["pass_seconds"]) == {"calibrate", "gptq", "bias_correction"}
    assert report["parity_ok"] is True
    assert report["metric_int8"] >= report["metric_fp32"] - 0.01
    assert yaml.safe_load((out / "recipe.yaml").read_text())["passes"] == ["bias_correction", "gptq"]
    assert "Post-training passes: gptq" in (out / "report.md").read_text()


def test_unknown_pass_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--passes", "cle,magic", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lowbit: error: unknown pass 'magic'; known passes: cle, adaround, gptq, bias_correction"]
    assert not (tmp_path / "o").exists()
