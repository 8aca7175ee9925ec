"""``lowbit serve`` as a real process (starts, answers, stops cleanly on SIGINT) and ``lowbit recalibrate``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from lowbit.cli.main import main
from lowbit.serve.models import active_version
from lowbit.serve.recalibrate import is_better
from lowbit.serve.server import bind_socket

from .helpers import Client, copy_dir, direct_run, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Addr:
    def __init__(self, port: int) -> None:
        self.host, self.port = "127.0.0.1", port


def test_serve_process_answers_and_stops_on_sigint(digits_dir, digits_inputs):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli.main", "serve", str(digits_dir), "--port", str(port),
                             "--shadow-rate", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        client = Client(_Addr(port))

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"lowbit serve exited early: {proc.stderr.read()}")
            try:
                return client.get_json("/health")["status"] == "ok"
            except OSError:
                client.close()
                return False

        wait_for(up, timeout=60, what="lowbit serve to listen")
        x = digits_inputs[:3]
        status, headers, raw = client.predict_raw(x)
        assert status == 200 and headers["x-dtype"] == "float32"
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(3, 10), direct_run(digits_dir / "model_int8.onnx", x))
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in out and "v1" in out


def test_serve_errors_are_one_line(tmp_path, digits_dir, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "lowbit: error: model folder" in capsys.readouterr().err
    assert main(["serve", str(digits_dir), "--threshold", "speed=3"]) == 2
    assert "lowbit: error: --threshold 'speed=3'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(digits_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "lowbit: error: cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_recalibrate_command_writes_a_version_and_decides_by_the_rule(digits_dir, tmp_path, capsys):
    folder = copy_dir(digits_dir, tmp_path / "recal")
    t0 = time.perf_counter()
    assert main(["recalibrate", str(folder), "--data", "digits", "--n-calib", "96", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    record = json.loads((folder / "versions" / "recalibrations.jsonl").read_text().splitlines()[-1])
    assert record["calib_samples"] + record["eval_samples"] == 96 and record["previous"] == "v1"
    assert record["accepted"] == (record["parity_ok"] and is_better(record["candidate"], record["current"])[0])
    assert active_version(folder) == ("v2" if record["accepted"] else "v1")
    assert (folder / "versions" / "v2").is_dir() == record["accepted"]  # a rejected version is removed
    assert "v1 → v2" in out and ("ACCEPTED" in out) == record["accepted"]
    assert time.perf_counter() - t0 < 60
    assert main(["recalibrate", str(folder), "--data", str(tmp_path / "nothing.npy")]) == 2


def test_recalibrate_rejects_inputs_of_the_wrong_shape(digits_dir, tmp_path, capsys):
    folder = copy_dir(digits_dir, tmp_path / "shape")
    data = tmp_path / "bad.npy"
    np.save(data, np.zeros((7, 3, 4, 4), np.float32))
    assert main(["recalibrate", str(folder), "--data", str(data)]) == 2
    assert "lowbit: error: data" in capsys.readouterr().err and not (folder / "versions").exists()


def test_listening_socket_declares_tcp():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with proto 0 every response written
    in two parts (headers, body) waited ~40 ms for the client's delayed ACK (measured: 44 ms vs 0.9 ms a request)."""
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()
