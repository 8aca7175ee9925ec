"""Re-calibration under attack: poisoned reservoirs, missing tokens, tampered folders (issue 14, items 1-4)."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest

from lowbit.cli.main import main
from lowbit.cli.serve import float_model_loader
from lowbit.outdir import DirLock
from lowbit.serve import ServeConfig, create_app
from lowbit.serve.models import active_version
from lowbit.serve.server import is_loopback
from serve.helpers import Client, copy_dir, direct_run, serving

from .conftest import ADMIN, TOKEN


def _accuracy(folder, version_dir_name, x, y) -> float:
    path = (folder if version_dir_name == "v1" else folder / "versions" / version_dir_name) / "model_int8.onnx"
    return float((direct_run(path, x).argmax(-1) == y).mean())


def _poison_and_recalibrate(folder, rows: np.ndarray) -> tuple[int, dict, str]:
    options = dict(shadow_rate=0.0, reservoir_size=256, min_recalibration_samples=32, admin_token=TOKEN)
    with serving(folder, float_model_loader, **options) as srv:
        client = Client(srv)
        for i in range(0, rows.shape[0], 8):
            status, _, _ = client.predict_raw(rows[i:i + 8])
            assert status in (200, 422)
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        version = client.get_json("/health")["version"]
        client.close()
    return status, json.loads(data), version


@pytest.mark.parametrize("attack", ["x10", "x100", "x1000", "duplicates"])
def test_poisoned_reservoir_never_swaps_in_a_worse_version(guarded_dir, digits_data, tmp_path, attack):
    x, y = digits_data
    folder = copy_dir(guarded_dir, tmp_path / attack)
    rows = np.tile(x[:4], (64, 1, 1, 1)) if attack == "duplicates" else x[:256] * float(attack[1:])
    status, result, served = _poison_and_recalibrate(folder, rows)
    base = _accuracy(folder, "v1", x, y)
    active = active_version(folder)
    assert served == active and _accuracy(folder, active, x, y) >= base  # real test accuracy never drops
    if attack == "duplicates":  # the reservoir keeps 4 distinct rows: too few to re-calibrate at all
        assert status == 409 and "holds 4 input rows" in result["error"]
    else:
        assert status == 200 and not result["accepted"] and "worse on the trusted rows" in result["reason"]
        assert result["trusted"]["rows"] == x.shape[0]
        assert result["trusted"]["candidate"]["accuracy"] < result["trusted"]["current"]["accuracy"]
        assert not (folder / "versions" / result["version"]).exists()  # a rejected version is removed
        history = [json.loads(line) for line in (folder / "versions" / "recalibrations.jsonl").read_text().splitlines()]
        assert [h["version"] for h in history] == [result["version"]] and history[0]["accepted"] is False
    restarted = create_app(ServeConfig(folder))  # a restart still serves the original
    assert restarted.engine.models.version == "v1"
    restarted.close()


def test_admin_endpoint_needs_the_token(guarded_dir, digits_data):
    with serving(guarded_dir, float_model_loader, shadow_rate=0.0) as srv:  # no token configured
        client = Client(srv)
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        assert status == 403 and "--admin-token-file" in json.loads(data)["error"]
        client.close()
    with serving(guarded_dir, float_model_loader, shadow_rate=0.0, admin_token=TOKEN) as srv:
        client = Client(srv)
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            status, got, data = client.request("POST", "/recalibrate", headers=headers)
            assert status == 401 and got["www-authenticate"] == "Bearer", data
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)  # authorised: reaches the checks
        assert status == 409 and "reservoir holds 0" in json.loads(data)["error"]
        client.close()
    assert not (guarded_dir / "versions").exists()


def test_token_from_file_or_environment_and_warning_off_loopback(guarded_dir, tmp_path, monkeypatch, caplog):
    from lowbit.cli import serve as cli_serve

    seen = {}
    monkeypatch.setattr(cli_serve, "run_server", lambda app, sock, log_level: seen.update(token=app.config.admin_token))
    monkeypatch.setattr(cli_serve, "bind_socket", lambda host, port: cli_serve.__dict__["_real_bind"]("127.0.0.1", 0))
    monkeypatch.setitem(cli_serve.__dict__, "_real_bind", __import__("lowbit.serve.server").serve.server.bind_socket)
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789abcdef\n")
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert main(["serve", str(guarded_dir), "--host", "0.0.0.0", "--admin-token-file", str(token_file)]) == 0
        assert seen["token"] == "file-token-0123456789abcdef" and not caplog.records
        monkeypatch.setenv("LOWBIT_ADMIN_TOKEN", "env-token-0123456789abcdef")
        assert main(["serve", str(guarded_dir), "--host", "0.0.0.0"]) == 0 and seen["token"].startswith("env-token")
        monkeypatch.delenv("LOWBIT_ADMIN_TOKEN")
        assert main(["serve", str(guarded_dir), "--host", "0.0.0.0"]) == 0 and seen["token"] is None
    assert any("without an admin token" in r.getMessage() for r in caplog.records)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


@pytest.mark.parametrize("tamper", ["os:abort", "weights", "recipe", "no_record"])
def test_tampered_folder_is_refused_and_the_server_keeps_serving(guarded_dir, digits_data, tmp_path, tamper):
    folder = copy_dir(guarded_dir, tmp_path / "tampered")
    report = json.loads((folder / "report.json").read_text())
    if tamper == "os:abort":
        report["model"] = "os:abort"
    elif tamper == "weights":
        report["model_sha256"] = "0" * 64
    elif tamper == "no_record":
        del report["model_sha256"]
    else:
        (folder / "recipe.yaml").write_text((folder / "recipe.yaml").read_text() + "\n# edited\n")
    (folder / "report.json").write_text(json.dumps(report))
    with serving(folder, float_model_loader, shadow_rate=0.0, admin_token=TOKEN, min_recalibration_samples=32) as srv:
        client = Client(srv)
        assert client.predict_raw(digits_data[0][:32])[0] == client.predict_raw(digits_data[0][32:64])[0] == 200
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        alive, _ = client.predict_json(digits_data[0][:1])
        client.close()
    expected = {"os:abort": "standard-library", "weights": "other weights", "recipe": "recipe_sha256",
                "no_record": "older lowbit"}[tamper]
    assert status == 422 and expected in json.loads(data)["error"] and alive == 200
    assert not (folder / "versions").exists() or not any((folder / "versions").glob("v*"))


def test_keep_versions_and_stale_staging_are_cleaned(guarded_dir, digits_data, tmp_path):
    folder = copy_dir(guarded_dir, tmp_path / "kept")
    versions = folder / "versions"
    for n in (2, 3, 4):
        copy_dir(guarded_dir, versions / f"v{n}")
    (versions / "active.json").write_text(json.dumps({"version": "v3"}))
    dead = versions / ".v9.tmp-999999999-abc"
    dead.mkdir()
    live = versions / f".v8.tmp-{os.getppid()}-abc"  # a live process (the test runner's parent)
    live.mkdir()
    app = create_app(ServeConfig(folder))
    app.close()
    assert not dead.exists() and live.exists()  # staging of a dead process goes, a running one stays
    from lowbit.serve.versions import prune_versions

    assert prune_versions(folder, 1) == ["v4", "v2"] and sorted(p.name for p in versions.glob("v*")) == ["v3"]


def test_one_recalibration_at_a_time(guarded_dir, tmp_path, capsys):
    folder = copy_dir(guarded_dir, tmp_path / "busy")
    lock = DirLock(folder / ".recalibrate.lock")
    assert lock.acquire()
    try:
        t0 = time.perf_counter()
        assert main(["recalibrate", str(folder), "--data", "digits", "--n-calib", "64"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another re-calibration" in err[0] and time.perf_counter() - t0 < 30
    finally:
        lock.release()
    assert not (folder / "versions").exists()


def test_extreme_rows_in_the_reservoir_do_not_break_recalibration(guarded_dir, digits_data, tmp_path):
    """3e38 rows get a finite INT8 answer (the input quantizer clips) and enter the reservoir; re-calibration drops
    them (their FP32 output is not finite) instead of failing."""
    x, _ = digits_data
    folder = copy_dir(guarded_dir, tmp_path / "extreme")
    with serving(folder, float_model_loader, shadow_rate=0.0, admin_token=TOKEN, min_recalibration_samples=32) as srv:
        client = Client(srv)
        big = np.stack([np.full((1, 8, 8), v, np.float32) for v in (3e38, 2e38)])  # finite, distinct rows
        extreme, _, _ = client.predict_raw(big)
        for i in range(0, 64, 32):
            assert client.predict_raw(x[i:i + 32])[0] == 200
        rows = client.get_json("/health")["reservoir"]["rows"]
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        client.close()
    result = json.loads(data)
    assert extreme == 200 and rows == 66
    assert status == 200 and result["calib_samples"] + result["eval_samples"] == 64, result
