"""lowbit quantize --passes: the passes run, the report and recipe say so, bad names fail in one line."""

from __future__ import annotations

import json

import pytest
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


def test_memory_budget_zero_gives_the_same_model_as_the_frontier(tmp_path):
    """--memory-budget-mb 0 re-runs the model up to each layer; the default keeps activations: same files."""
    outs = []
    for budget in ("0", "512"):
        out = tmp_path / f"out{budget}"
        rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--passes", "gptq,bias_correction",
                   "--pass-batches", "2", "--memory-budget-mb", budget, "--out", str(out), "--repeats", "1"])
        assert rc == 0
        outs.append(json.loads((out / "report.json").read_text()))
    assert outs[0]["metric_int8"] == outs[1]["metric_int8"] and outs[0]["kl"] == outs[1]["kl"]


def test_negative_memory_budget_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        main(["quantize", "--model", "digits-cnn", "--data", "digits", "--memory-budget-mb", "-5",
              "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err[-1]) < 200 and "--memory-budget-mb" in err[-1] and ">= 0" in err[-1]
    assert not (tmp_path / "o").exists()
