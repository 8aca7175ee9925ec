"""Soak test of ``lowbit serve``: sustained load with malformed requests, fuse trips and hot swaps (issue 14).

One ``lowbit serve`` process (digits-cnn, quantized once by ``lowbit quantize``; ``--shadow-rate 0.2
--max-bad 3 --recover-good 5 --threads 1 --workers 2``, admin token from a file) is loaded for ``--minutes``
by ``--clients`` keep-alive HTTP/1.1 clients sending back to back (the load the server holds on this machine):

* 95% good requests: one real digits row (raw float32 or JSON, alternately), expected ``200``;
* 5% malformed requests drawn from a fixed list (bad JSON, JSON nested 5000 deep, wrong shape, ``X-Shape`` with 65
  dimensions, a wrong content type, an oversized body, extreme values 3e38 in JSON), expected ``4xx``.

The run has six equal phases whose good rows are scaled by ``PHASE_SCALE`` = 1, 4, 1, 2, 4, 1 (x4 on the
original model: INT8 clips, the shadow judges samples bad and the fuse trips). At the end of phases 2, 4 and 5
``POST /recalibrate`` rebuilds the INT8 model from the reservoir (then holding that phase's rows) and hot-swaps it
when it is better on held-out reservoir rows and not worse on the trusted rows: three swaps are expected
(calibrated for x4, then x2, then x4 again).

Reported (``bench/results/soak.json``): good requests sent / answered 200 / lost (connection errors, timeouts)
/ 5xx; malformed requests and their status codes; p50 / p99 / max latency of good requests; fuse trips and
recoveries; re-calibrations and their outcomes (with the RSS right after each); the server's RSS at the start
(after 10 s of load), at the end, and its peak (sampled every second), in MiB; tracebacks in the server log.
The first re-calibration imports torch and the quantization pipeline into the server (a one-off step of about
90 MiB); "flat" means no growth after that, which ``rss_mib.end`` vs the first ``rss_mib_after`` shows.

Usage: ``.venv/bin/python bench/soak.py [--minutes 10] [--clients 2] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import stamp, write_results  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
PHASE_SCALE = (1.0, 4.0, 1.0, 2.0, 4.0, 1.0)
MALFORMED_SHARE = 0.05
RECAL_AFTER_PHASE = (2, 4, 5)


def lowbit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli.main", *args]


def prepare(folder: Path) -> np.ndarray:
    """Quantize digits-cnn into ``folder``; the digits test rows ``[449, 1, 8, 8]``."""
    subprocess.run(lowbit_cmd("quantize", "--model", "digits-cnn", "--data", "digits", "--out", str(folder),
                              "--repeats", "1", "--force"), check=True, env=ENV, stdout=subprocess.DEVNULL)
    code = "import numpy as np, sys; from lowbit.zoo import load_data; np.save(sys.argv[1], load_data('digits').eval_inputs.numpy())"
    subprocess.run([sys.executable, "-c", code, str(folder.parent / "rows.npy")], check=True, env=ENV)
    return np.load(folder.parent / "rows.npy").astype(np.float32)


def malformed_requests() -> list[tuple[str, bytes, dict]]:
    """``(name, body, headers)`` of the malformed requests the clients mix in."""
    j, raw = {"Content-Type": "application/json"}, {"Content-Type": "application/octet-stream"}
    return [
        ("bad_json", b'{"inputs": [1, 2,', j),
        ("deep_json", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", j),
        ("wrong_shape", json.dumps({"inputs": [[1.0, 2.0, 3.0]]}).encode(), j),
        ("x_shape_65", np.ones(64, "<f4").tobytes(), {**raw, "X-Shape": ",".join(["1"] * 65)}),
        ("content_type", b"hello", {"Content-Type": "text/plain"}),
        ("too_large", b"\0" * (2 * 32 * 64 * 4), raw),  # twice the raw body limit of digits (--max-batch 32)
        ("extreme_3e38", json.dumps({"inputs": np.full((1, 1, 8, 8), 3e38).tolist()}).encode(), j),
    ]


class Tally:
    """Counters shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.good = {"sent": 0, "ok": 0, "lost": 0, "5xx": 0, "other": 0}
        self.bad: dict[str, int] = {}
        self.latencies: list[float] = []
        self.models: dict[str, int] = {}


def _request(conn_box: list, port: int, body: bytes, headers: dict) -> tuple[int, bytes]:
    for attempt in range(2):
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn_box[0].request("POST", "/predict", body=body, headers=headers)
            resp = conn_box[0].getresponse()
            data = resp.read()
            if resp.getheader("connection", "").lower() == "close":
                conn_box[0].close()
                conn_box[0] = None
            return resp.status, data
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn_box[0].close()
            conn_box[0] = None
            if attempt:
                raise
    raise AssertionError("unreachable")


def client(port: int, rows: np.ndarray, phase_of, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Send requests back to back until ``stop``; good rows scaled by the phase's ``PHASE_SCALE``."""
    rng, bad = random.Random(seed), malformed_requests()
    conn_box: list = [None]
    i = seed
    while not stop.is_set():
        i += 1
        if rng.random() < MALFORMED_SHARE:
            name, body, headers = bad[rng.randrange(len(bad))]
            try:
                status, _ = _request(conn_box, port, body, headers)
            except OSError:
                status = -1
            with tally.lock:
                tally.bad[f"{name}:{status}"] = tally.bad.get(f"{name}:{status}", 0) + 1
            continue
        row = rows[i % rows.shape[0]][None] * PHASE_SCALE[phase_of() - 1]
        if i % 2:
            body, headers = row.astype("<f4").tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": "1,1,8,8"}
        else:
            body, headers = json.dumps({"inputs": row.tolist()}).encode(), {"Content-Type": "application/json"}
        t0 = time.perf_counter()
        try:
            status, data = _request(conn_box, port, body, headers)
        except OSError:
            status, data = -1, b""
        dt = time.perf_counter() - t0
        with tally.lock:
            tally.good["sent"] += 1
            key = "ok" if status == 200 else "lost" if status == -1 else "5xx" if status >= 500 else "other"
            tally.good[key] += 1
            if status == 200:
                tally.latencies.append(dt)
                if headers["Content-Type"] == "application/json":
                    model = json.loads(data)["model"]
                    tally.models[model] = tally.models.get(model, 0) + 1


def admin(port: int, token: str, path: str, method: str = "POST", timeout: float = 300) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def start_server(folder: Path, token_file: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = lowbit_cmd("serve", str(folder), "--port", str(port), "--shadow-rate", "0.2", "--max-bad", "3",
                      "--recover-good", "5", "--threads", "1", "--workers", "2", "--admin-token-file", str(token_file),
                      "--reservoir-size", "256", "--min-recalibration-samples", "64")
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if admin(port, "", "/health", "GET", 2)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"lowbit serve exited early: {log_path.read_text()[-2000:]}")
    raise RuntimeError("lowbit serve did not start")


def run(minutes: float, clients: int, workdir: Path) -> dict:
    """The whole soak; the result row."""
    folder = workdir / "digits"
    rows = prepare(folder)
    token = secrets.token_urlsafe(24)
    token_file = workdir / "token"
    token_file.write_text(token + "\n")
    log_path = workdir / "serve.log"
    proc, port = start_server(folder, token_file, log_path)
    server = psutil.Process(proc.pid)
    duration, t_start = minutes * 60.0, time.monotonic()
    phase_len = duration / 6

    def phase_of() -> int:
        return min(6, int((time.monotonic() - t_start) / phase_len) + 1)

    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client, args=(port, rows, phase_of, stop, tally, 1000 * k)) for k in range(clients)]
    for t in threads:
        t.start()
    rss, recals, done = [], [], set()
    try:
        while time.monotonic() - t_start < duration:
            rss.append((time.monotonic() - t_start, server.memory_info().rss / 2**20))
            phase = phase_of()
            finished = phase - 1
            if finished in RECAL_AFTER_PHASE and finished not in done:
                done.add(finished)
                t0 = time.monotonic()
                status, body = admin(port, token, "/recalibrate")
                recals.append({"after_phase": finished, "status": status, "seconds": time.monotonic() - t0,
                               "accepted": body.get("accepted"), "version": body.get("version"),
                               "reason": body.get("reason", body.get("error")),
                               "rss_mib_after": server.memory_info().rss / 2**20})
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
        status, health = admin(port, token, "/health", "GET")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return summarize(tally, rss, recals, health, log_path, minutes, clients)


def summarize(tally: Tally, rss: list, recals: list, health: dict, log_path: Path, minutes: float,
              clients: int) -> dict:
    lat = np.asarray(tally.latencies) * 1000
    steady = [m for t, m in rss if t >= 10] or [m for _, m in rss]
    log_text = log_path.read_text()
    return {
        "model": "digits-cnn", "minutes": minutes, "clients": clients, "malformed_share": MALFORMED_SHARE,
        "good": tally.good, "good_rps": tally.good["sent"] / (minutes * 60),
        "malformed": dict(sorted(tally.bad.items())),
        "malformed_5xx": sum(v for k, v in tally.bad.items() if int(k.rsplit(":", 1)[1]) >= 500),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
        "served_json_by_model": tally.models,
        "fuse": health["fuse"], "recalibrations": recals,
        "hot_swaps": sum(1 for r in recals if r["accepted"]), "final_version": health["version"],
        "rss_mib": {"start": steady[0], "end": steady[-1], "peak": max(m for _, m in rss), "samples": len(rss)},
        "server_log_lines": len(log_text.splitlines()), "server_tracebacks": log_text.count("Traceback"),
        **stamp(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    ap.add_argument("--clients", type=int, default=2, help="keep-alive client threads (default 2)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        row = run(args.minutes, args.clients, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="lowbit-soak-") as tmp:
            row = run(args.minutes, args.clients, Path(tmp))
    write_results("soak", [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
