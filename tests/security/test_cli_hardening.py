"""The CLI under careless and hostile use: concurrent writers, signals, bad paths, alias bombs (items 8-12)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.cli.main import main
from lowbit.outdir import DirLock
from lowbit.transforms.recipe import load_recipe

HERE = Path(__file__).parent
SRC = Path(__file__).parents[2] / "src"
BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
passes: [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def _env() -> dict:
    path = os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _lowbit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowbit.cli.main", *args], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _slow_quantize(out: Path, *extra: str) -> subprocess.Popen:
    return _lowbit("quantize", "--model", "slow_models:slow", "--input-shape", "1,1,8,8", "--data", "digits",
                   "--calibrator", "minmax",
                   "--out", str(out), "--repeats", "1", "--n-calib", "256", *extra)


def _wait_for_staging(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(parent.glob(f".{name}.tmp-*"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no staging folder appeared")


@pytest.fixture(autouse=True)
def _models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_second_writer_fails_in_one_line_and_force_waits(tmp_path):
    out = tmp_path / "out"
    first = _slow_quantize(out)
    _wait_for_staging(tmp_path, "out", first)
    second = _lowbit("quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--repeats", "1")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and len(err.strip().splitlines()) == 1 and "is being written by pid" in err
    forced = _lowbit("quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--repeats", "1",
                     "--force")
    assert first.wait(timeout=300) == 0
    assert forced.wait(timeout=300) == 0, forced.communicate()
    assert "digits-cnn" in (out / "report.json").read_text()  # the forced run replaced the first, after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, backup or lock left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_is_handled_like_sigint(tmp_path, sig):
    out = tmp_path / "out"
    proc = _slow_quantize(out)
    _wait_for_staging(tmp_path, "out", proc)
    time.sleep(1.0)  # mid-run, not in the instant the staging folder appears (a full-suite run once saw -2 there)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "nothing was written" in err, (proc.returncode, err[-3000:])
    assert list(tmp_path.iterdir()) == []


def test_staging_of_a_killed_run_is_removed_by_the_next_writer(tmp_path):
    out = tmp_path / "out"
    proc = _slow_quantize(out)
    staging = _wait_for_staging(tmp_path, "out", proc)
    proc.kill()
    proc.wait(timeout=30)
    assert staging.is_dir()  # kill -9 cannot clean up
    assert main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--repeats", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_output_paths_are_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(blocker / "sub" / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    locked = tmp_path / "ro"
    locked.mkdir()
    _make_unwritable(locked, True)  # root ignores permission bits: make the folder immutable instead
    try:
        rc = main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(locked / "out")])
    finally:
        _make_unwritable(locked, False)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"lowbit: error: output {locked / 'out'}: no permission to write in {locked}"]


def _make_unwritable(folder: Path, on: bool) -> None:
    if os.getuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(folder)], check=True)
    else:
        folder.chmod(0o500 if on else 0o700)


def test_model_calling_sys_exit_is_reported(tmp_path, capsys):
    assert main(["quantize", "--model", "slow_models:exits", "--input-shape", "1,1,8,8", "--data", "digits",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slow_models:exits" in err[0] and "SystemExit" in err[0]


def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(BOMB)
    assert len(BOMB) < 500
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        load_recipe(recipe)
    assert main(["quantize", "--model", "digits-cnn", "--data", "digits", "--recipe", str(recipe),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert time.perf_counter() - t0 < 10 and len(err) == 1 and "aliases" in err[0] and len(err[0]) < 300


def test_long_values_in_recipe_errors_are_bounded(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(f"passes: {'y' * 100000}\nrules: {'z' * 100000}\n")
    with pytest.raises(ValueError) as info:
        load_recipe(recipe)
    assert len(str(info.value)) < 400 and "characters" in str(info.value)


def test_outputs_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(tmp_path / "out"),
                     "--repeats", "1"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_lock_is_exclusive_and_released(tmp_path):
    a, b = DirLock(tmp_path / ".x.lock"), DirLock(tmp_path / ".x.lock")
    assert a.acquire() and not b.acquire(0.3) and b.holder() == f"pid {os.getpid()}"
    a.release()
    assert b.acquire() and (tmp_path / ".x.lock").read_text() == str(os.getpid())
    b.release()
    assert not (tmp_path / ".x.lock").exists()
