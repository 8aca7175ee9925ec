"""``lowbit analyze``: digits-cnn end to end, refusal without --force, one-line errors, nothing partial."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.cli.main import main

HERE = Path(__file__).parent
LOWBIT = Path(sys.executable).parent / "lowbit"


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One real run on digits-cnn, with --force over a folder that holds a stale file."""
    root = tmp_path_factory.mktemp("analyze")
    out = root / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["analyze", "--model", "digits-cnn", "--data", "digits", "--recipe", "int8", "--out", str(out),
                   "--budget-seconds", "3", "--n-calib", "64", "--force"])
    return rc, out, buf.getvalue()


def _sqnr(v) -> float:
    """JSON SQNR ("inf" / "nan" strings included) as a float."""
    return float(v)


@pytest.mark.slow
def test_digits_writes_json_and_html(digits_run):
    rc, out, stdout = digits_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.html", "analysis.json"]
    assert not list(out.parent.glob(".out.*"))  # no staging / backup folder left
    data = json.loads((out / "analysis.json").read_text())
    assert data["model"] == "digits-cnn" and data["samples"] == 64
    rows = data["rows"]
    assert len(rows) >= 5 and {"conv1", "fc"} <= {r["layer"] for r in rows}
    for r in rows:
        for key in ("layer", "type", "sqnr_db_isolated", "sqnr_db_cumulative", "sensitivity", "flags",
                    "verdict", "fix_rule"):
            assert key in r
    page = (out / "analysis.html").read_text()
    for chart in ("chart-sqnr", "chart-sensitivity", "chart-hist-0"):
        assert f'id="{chart}"' in page
    assert page.count("<tr") == len(rows) + 1


@pytest.mark.slow
def test_digits_prints_five_worst_layers(digits_run):
    _, out, stdout = digits_run
    rows = json.loads((out / "analysis.json").read_text())["rows"]
    worst = sorted(rows, key=lambda r: _sqnr(r["sqnr_db_cumulative"]))[:5]
    assert "5 worst layers by cumulative SQNR" in stdout
    for r in worst:
        assert r["layer"] in stdout
    best = max(rows, key=lambda r: _sqnr(r["sqnr_db_cumulative"]))
    if len(rows) > 5:
        assert f"│ {best['layer']} " not in stdout
    assert f"wrote {out}/" in stdout


@pytest.mark.slow
def test_existing_out_is_refused_without_force(digits_run, capsys):
    _, out, _ = digits_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = main(["analyze", "--model", "digits-cnn", "--data", "digits", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("lowbit: error: ") and "--force" in err[0] and str(out) in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_tiny_module_model_on_npy(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "res"
    rc = main(["analyze", "--model", "lowbit_cli_models:tiny", "--input-shape", "3,8,8",
               "--data", str(tmp_path / "x.npy"), "--out", str(out), "--budget-seconds", "1",
               "--calibrator", "minmax"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "analysis.json").read_text())
    assert data["calibrator"] == "minmax" and {r["layer"] for r in data["rows"]} >= {"conv", "fc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res", "x.npy"]


def _run_error(capsys, tmp_path, args, culprit):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["analyze", *args, "--out", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("lowbit: error: ") and culprit in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return lines[0]


@pytest.mark.parametrize("args, culprit", [
    (["--model", "resnet9000", "--data", "digits"], "'resnet9000'"),
    (["--model", "digits-cnn", "--data", "nowhere/at/all"], "'nowhere/at/all'"),
    (["--model", "digits-cnn", "--data", "digits", "--recipe", "int3"], "int3"),
    (["--model", "lowbit_cli_models:tiny", "--data", "digits"], "--input-shape"),
    (["--model", "digits-cnn", "--data", "digits", "--budget-seconds", "-1"], "--budget-seconds"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, culprit):
    _run_error(capsys, tmp_path, args, culprit)


def test_failure_inside_the_analysis_leaves_nothing(capsys, tmp_path, monkeypatch):
    import lowbit.jobs.analyze

    def boom(*args, **kwargs):
        raise RuntimeError("analysis exploded\nsecond line")

    monkeypatch.setattr(lowbit.jobs.analyze, "analyze", boom)
    line = _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "digits"], "analysis exploded")
    assert "second line" not in line


def test_subprocess_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([str(LOWBIT), "analyze", "--model", "nope", "--data", "digits", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("lowbit: error: ")
    assert not (tmp_path / "o").exists()
