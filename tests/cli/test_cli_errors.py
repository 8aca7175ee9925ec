"""lowbit CLI: every user error is ONE line ``lowbit: error: ...`` naming the culprit, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.cli.main import main

HERE = Path(__file__).parent
LOWBIT = Path(sys.executable).parent / "lowbit"


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _run_error(capsys, tmp_path, args, culprit):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["quantize", *args, "--out", str(out), "--repeats", "1"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lowbit: error: ")
    assert culprit in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left either
    return lines[0]


def _images(folder: Path, n_good: int, n_bad: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    for i in range(n_bad):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    if n_bad:
        (folder / "notes.txt").write_text("not an image")


def test_unknown_model(capsys, tmp_path):
    line = _run_error(capsys, tmp_path, ["--model", "resnet9000", "--data", "digits"], "'resnet9000'")
    assert "neither a zoo model" in line


def test_missing_attribute(capsys, tmp_path):
    line = _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:missing", "--data", "digits"],
                      "'lowbit_cli_models:missing'")
    assert "AttributeError" in line


def test_missing_module(capsys, tmp_path):
    line = _run_error(capsys, tmp_path, ["--model", "no_such_pkg.mod:make", "--data", "digits"], "no_such_pkg")
    assert "ModuleNotFoundError" in line


def test_model_callable_that_raises(capsys, tmp_path):
    line = _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:broken", "--data", "digits"],
                      "'lowbit_cli_models:broken' failed to build")
    assert "RuntimeError: boom while building" in line


def test_model_callable_returning_non_module(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:not_a_module", "--data", "digits"],
               "returned int, not a torch.nn.Module")


def test_module_model_without_input_shape(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--data", "digits"], "pass --input-shape")


def test_folder_of_only_corrupt_files(capsys, tmp_path):
    folder = tmp_path / "pics"
    _images(folder, 0, 3)
    line = _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8",
                                         "--data", str(folder)], str(folder))
    assert "no readable image among 4 files" in line


def test_npy_with_wrong_sample_shape(capsys, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((5, 3, 9, 9), dtype=np.float32))
    line = _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8",
                                         "--data", str(path)], str(path))
    assert "samples of shape (3, 9, 9)" in line and "expects (3, 8, 8)" in line


def test_unreadable_npy(capsys, tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(b"garbage")
    _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8",
                                  "--data", str(path)], f"data file {path}: cannot read it")


def test_unknown_data(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "mnist"], "data 'mnist' is not a zoo data set")


def test_bad_input_shape(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,three",
                                  "--data", "digits"], "--input-shape '1,three'")


def test_malformed_recipe_yaml(capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("weight: {bits: 8\ninput: [\n")
    _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "digits", "--recipe", str(path)],
               f"recipe file {path}: malformed YAML")


def test_unknown_recipe_key(capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("weight: {bits: 8}\ncalibration: entropy\n")
    line = _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "digits", "--recipe", str(path)],
                      "unknown key 'calibration'")
    assert str(path) in line


def test_unknown_recipe_preset(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "digits", "--recipe", "int4"],
               "recipe 'int4' is neither a preset")


def test_bad_eval_function(capsys, tmp_path):
    _run_error(capsys, tmp_path, ["--model", "digits-cnn", "--data", "digits", "--eval", "lowbit_cli_models"],
               "expected 'package.module:callable'")


def test_existing_out_is_refused_without_force(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == f"lowbit: error: output {out} already exists; pass --force to replace it"
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_subprocess_exit_code_and_single_line(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(HERE))
    proc = subprocess.run(
        [str(LOWBIT), "quantize", "--model", "lowbit_cli_models:broken", "--data", "digits", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "lowbit: error: model 'lowbit_cli_models:broken' failed to build: RuntimeError: boom while building"
    ]
    assert proc.stdout == ""
    assert not out.exists()


def test_failure_inside_the_pipeline_leaves_no_staging_folder(capsys, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 1, 8, 8), dtype=np.float32))  # fits --input-shape, not the 3-channel conv
    line = _run_error(capsys, tmp_path, ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,1,8,8",
                                         "--data", str(path)], "channels")
    assert "expected input" in line
