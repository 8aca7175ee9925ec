"""lowbit quantize with a mixed-precision search (in-process): fallback and bit allocation end to end on
digits-cnn, the search section checked against the report's own ONNX Runtime figures, and bad flags."""

from __future__ import annotations

import json
import os

import pytest

import lowbit
from lowbit.cli.main import main

COARSE = "weight: {bits: 3}\ninput: {bits: 4}\n"  # digits-cnn falls to ~0.82 agreement: something to search


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    recipe = root / "coarse.yaml"
    recipe.write_text(COARSE)
    common = ["quantize", "--model", "digits-cnn", "--data", "digits", "--repeats", "1", "--n-eval", "200"]
    fb = main(common + ["--recipe", str(recipe), "--out", str(root / "fb"), "--min-agreement", "0.99"])
    al = main(common + ["--out", str(root / "al"), "--avg-bits", "4", "--act-bits", "8"])
    drop = main(common + ["--out", str(root / "drop"), "--max-drop", "0.5"])
    return root, fb, al, drop


def test_fallback_writes_recipe_report_section_and_plot(runs):
    root, rc, _, _ = runs
    out = root / "fb"
    assert rc == 0
    assert sorted(os.listdir(out)) == ["model_fp32.onnx", "model_int8.onnx", "recipe.yaml", "report.json",
                                       "report.md", "search.html", "trusted_inputs.npy", "trusted_labels.npy"]
    report = json.loads((out / "report.json").read_text())
    s = report["search"]
    assert s["kind"] == "fallback" and s["met"] and s["verified"] and s["engine"] == "onnxruntime"
    assert s["target"] == {"min_agreement": 0.99, "max_drop": None} and s["n_float"] == len(s["float_layers"]) > 0
    # searched on the report's samples with the report's engine: the report sees exactly the search's figures
    assert s["report_check"] == {"agreement": report["top1_agreement"], "met": True,
                                 "metric_drop": report["metric_fp32"] - report["metric_int8"]}
    assert s["agreement"] == report["top1_agreement"] >= 0.99
    recipe = lowbit.load_recipe(out / "recipe.yaml")
    assert recipe == lowbit.load_recipe(root / "coarse.yaml").keep_float(*s["float_layers"])
    assert sorted(f["layer"] for f in report["float_layers"]) == sorted(s["float_layers"])
    assert 'id="chart-fallback"' in (out / "search.html").read_text()


def test_allocation_writes_per_layer_bits_and_pareto(runs):
    root, _, rc, _ = runs
    out = root / "al"
    assert rc == 0
    s = json.loads((out / "report.json").read_text())["search"]
    assert s["kind"] == "bit_allocation" and s["avg_bits"] <= 4 and s["budget"]["act_bits"] == [8]
    recipe = lowbit.load_recipe(out / "recipe.yaml")
    for name, b in s["bits"].items():
        w, a = recipe.resolve(name, "Conv2d" if name != "fc" else "Linear")
        assert w.bits == min(b["weight_bits"], lowbit.transforms.recipe.machine_weight_bits()) and a.bits == 8
    assert {b["weight_bits"] for b in s["bits"].values()} <= {2, 4, 8}
    assert len(s["pareto"]) >= 2 and any(p["chosen"] for p in s["pareto"])
    assert 'id="chart-pareto"' in (out / "search.html").read_text()


def test_max_drop_is_in_percentage_points(runs):
    """int8 digits keeps its accuracy: the half-point target holds with nothing float, checked as 0.005."""
    root, _, _, rc = runs
    report = json.loads((root / "drop" / "report.json").read_text())
    s = report["search"]
    assert rc == 0 and s["target"] == {"min_agreement": None, "max_drop": 0.005} and s["max_drop_points"] == 0.5
    assert s["met"] and s["float_layers"] == [] and s["metric_name"] == "accuracy"
    assert s["report_check"]["met"] and s["metric"] == report["metric_int8"]
    assert lowbit.load_recipe(root / "drop" / "recipe.yaml") == lowbit.preset("int8")


@pytest.mark.parametrize("extra, message", [
    (["--min-agreement", "0.99", "--avg-bits", "4"], "cannot be combined with --avg-bits"),
    (["--max-drop", "-1"], "--max-drop must be >= 0"),
    (["--min-agreement", "2"], "min_agreement must be in (0, 1]"),
    (["--avg-bits", "4", "--act-bits", "8,x"], "--act-bits '8,x'"),
])
def test_bad_search_flags_exit_2_with_one_line(tmp_path, capsys, extra, message):
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("lowbit: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_before_searching(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--min-agreement", "0.99"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
