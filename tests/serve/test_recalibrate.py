"""Input drift end to end: the fuse trips and recovers, then re-calibration on the reservoir hot-swaps a better
INT8 model while two clients keep sending requests, and none is lost."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from lowbit.cli.serve import float_model_loader
from lowbit.serve import ServeConfig, create_app
from lowbit.serve.models import active_version, next_version, version_dir
from lowbit.serve.recalibrate import is_better, split_holdout

from .helpers import Client, copy_dir, direct_run, serving, wait_for

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
DRIFT = 4.0  # digits pixels are in [0, 1]; x4 saturates the INT8 input quantizer (output SQNR ~2 dB)


def _send_and_wait(client: Client, x: np.ndarray) -> dict:
    """One request, then wait until the shadow has judged it (keeps the fuse sequence deterministic)."""
    before = client.get_json("/health")["shadow"]["compared"]
    status, body = client.predict_json(x)
    assert status == 200, body
    wait_for(lambda: client.get_json("/health")["shadow"]["compared"] > before, what="the shadow verdict")
    return body


def _load(srv, x: np.ndarray, stop: threading.Event, tally: dict, lock: threading.Lock) -> None:
    client = Client(srv)
    sent = answered = 0
    versions = set()
    while not stop.is_set():
        sent += 1
        status, body = client.predict_json(x)
        if status == 200:
            answered += 1
            versions.add(body["version"])
    client.close()
    with lock:
        tally["sent"] += sent
        tally["answered"] += answered
        tally["versions"] |= versions


def test_drift_trips_recovers_and_recalibration_hot_swaps_under_load(digits_dir, digits_inputs, tmp_path):
    folder = copy_dir(digits_dir, tmp_path / "drift")
    drifted, normal = digits_inputs[:64] * DRIFT, digits_inputs[64:128]
    options = dict(shadow_rate=1.0, max_bad=3, recover_good=3, reservoir_size=48, min_recalibration_samples=32,
                   admin_token=TOKEN)
    with serving(folder, float_model_loader, **options) as srv:
        client = Client(srv)
        served = [_send_and_wait(client, drifted[4 * i:4 * i + 4])["model"] for i in range(4)]
        assert served == ["int8", "int8", "int8", "fp32"]  # three bad samples in a row open the fuse
        served = [_send_and_wait(client, normal[4 * i:4 * i + 4])["model"] for i in range(4)]
        assert served == ["fp32", "fp32", "fp32", "int8"]  # three good samples close it again
        fuse = client.get_json("/health")["fuse"]
        assert (fuse["trips"], fuse["recoveries"]) == (1, 1)

        for i in range(12):  # the reservoir now holds drifted rows only
            assert client.predict_json(drifted[(4 * i) % 64:(4 * i) % 64 + 4])[0] == 200
        stop, lock = threading.Event(), threading.Lock()
        tally = {"sent": 0, "answered": 0, "versions": set()}
        loaders = [threading.Thread(target=_load, args=(srv, drifted[i:i + 2], stop, tally, lock)) for i in (0, 2)]
        for t in loaders:
            t.start()
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        wait_for(lambda: client.get_json("/health")["version"] == "v2", what="the swap")
        for _ in range(3):  # traffic after the swap
            client.predict_json(drifted[:2])
        stop.set()
        for t in loaders:
            t.join()
        result = json.loads(data)
        assert status == 200 and result["accepted"], result
        after = [_send_and_wait(client, drifted[4 * i:4 * i + 4]) for i in range(3)]
        health, metrics = client.get_json("/health"), client.metrics()
        client.close()

    assert tally["sent"] == tally["answered"] > 0 and tally["versions"] == {"v1", "v2"}
    assert result["version"] == "v2" and result["previous"] == "v1" and result["parity_ok"]
    assert result["candidate"]["sqnr_db"] > result["current"]["sqnr_db"] + 10
    v2 = version_dir(folder, "v2")
    assert active_version(folder) == "v2" and next_version(folder) == "v3"
    assert {"model_int8.onnx", "model_fp32.onnx", "report.json", "recalibration.json"} <= {p.name for p in v2.iterdir()}
    assert json.loads((v2 / "report.json").read_text())["recalibrated_from"] == "v1"
    assert json.loads((v2 / "recalibration.json").read_text())["accepted"] is True
    assert (folder / "model_int8.onnx").is_file()  # v1 kept
    restarted = create_app(ServeConfig(folder))  # a restart serves the active version
    assert restarted.engine.models.version == "v2"
    restarted.close()
    for body, i in zip(after, range(3)):  # drifted inputs are now fine for INT8
        assert body["model"] == "int8" and body["version"] == "v2"
        np.testing.assert_array_equal(np.asarray(body["outputs"], np.float32),
                                      direct_run(v2 / "model_int8.onnx", drifted[4 * i:4 * i + 4]))
    assert health["fuse"]["state"] == "closed" and health["fuse"]["consecutive_bad"] == 0
    assert metrics[("lowbit_model_info", (("version", "v2"),))] == 1
    assert metrics[("lowbit_recalibrations_total", (("result", "accepted"),))] == 1
    assert metrics[("lowbit_shadow_last", (("measure", "sqnr_db"),))] > 20


def test_recalibrate_refuses_without_loader_or_enough_rows(digits_dir, digits_inputs):
    with serving(digits_dir, shadow_rate=0.0, admin_token=TOKEN) as srv:
        client = Client(srv)
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        assert status == 409 and "loader" in json.loads(data)["error"]
    with serving(digits_dir, float_model_loader, shadow_rate=0.0, min_recalibration_samples=16,
                 admin_token=TOKEN) as srv:
        client = Client(srv)
        client.predict_json(digits_inputs[:4])
        status, _, data = client.request("POST", "/recalibrate", headers=ADMIN)
        assert status == 409 and "holds 4 input rows" in json.loads(data)["error"]
        client.close()
    assert not (digits_dir / "versions").exists()


def test_acceptance_rule_and_holdout_split():
    cur = {"top1_agreement": 0.9, "kl": 0.05, "sqnr_db": 20.0}
    assert is_better({**cur, "top1_agreement": 0.95}, cur)[0]
    assert is_better({**cur, "kl": 0.04}, cur)[0]
    assert not is_better(dict(cur), cur)[0]  # equal is not better: keep what is served
    assert not is_better({**cur, "top1_agreement": 0.85, "kl": 0.0}, cur)[0]
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    calib, held = split_holdout(x, 0.25, seed=0)
    assert held.shape[0] == 5 and calib.shape[0] == 15
    assert sorted(np.concatenate([calib, held])[:, 0].tolist()) == x[:, 0].tolist()
    with pytest.raises(ValueError, match="eval_fraction"):
        split_holdout(x, 1.0, seed=0)
