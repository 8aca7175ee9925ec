"""Helpers of the serving tests: a broken INT8 copy, a real server on loopback, a tiny keep-alive HTTP client."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from lowbit.serve import ServeConfig, ServerThread, create_app


def direct_session(path: Path) -> ort.InferenceSession:
    """A plain ONNX Runtime session, built here independently of lowbit (1 thread, as the servers use)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def direct_run(path: Path, x: np.ndarray) -> np.ndarray:
    return direct_session(path).run(None, {"input": x})[0]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def break_int8_model(folder: Path) -> None:
    """Negate every 4-D int8 weight constant of ``model_int8.onnx``: the INT8 model diverges from FP32."""
    path = folder / "model_int8.onnx"
    model = onnx.load(str(path))
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    broken = 0
    for tensor in tensors:
        arr = numpy_helper.to_array(tensor)
        if arr.dtype == np.int8 and arr.ndim == 4:
            tensor.CopyFrom(numpy_helper.from_array(np.clip(-arr.astype(np.int16), -127, 127).astype(np.int8), tensor.name))
            broken += 1
    assert broken, f"{path}: no int8 weight found to break"
    onnx.save(model, str(path))


@contextlib.contextmanager
def serving(folder: Path, loader=None, **options):
    """A real uvicorn server on 127.0.0.1 (free port) for ``folder``; yields the ServerThread."""
    app = create_app(ServeConfig(folder, **options), loader)
    with ServerThread(app) as srv:
        yield srv


class Client:
    """One keep-alive HTTP/1.1 connection (one per thread)."""

    def __init__(self, srv: ServerThread) -> None:
        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """``(status, headers, body bytes)``; reconnects once if the server closed the connection."""
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.conn.close()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def predict_json(self, x, **extra) -> tuple[int, dict]:
        status, _, data = self.request("POST", "/predict", json.dumps({"inputs": np.asarray(x).tolist(), **extra}).encode(),
                                       {"Content-Type": "application/json"})
        return status, json.loads(data)

    def predict_raw(self, x: np.ndarray, headers: dict | None = None) -> tuple[int, dict, bytes]:
        hdrs = {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape)), **(headers or {})}
        return self.request("POST", "/predict", np.ascontiguousarray(x, dtype="<f4").tobytes(), hdrs)

    def get_json(self, path: str) -> dict:
        status, _, data = self.request("GET", path)
        assert status == 200, data
        return json.loads(data)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """``{(sample name, sorted label items): value}`` from ``GET /metrics`` (parsed by prometheus_client)."""
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(data.decode()) for s in fam.samples}

    def close(self) -> None:
        self.conn.close()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll ``predicate()`` until it returns a truthy value (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def quantize_digits_dir(parent: Path, n_eval: int | None = None) -> Path:
    """``lowbit quantize --model digits-cnn --data digits`` into ``parent/digits``; its evaluation (and trusted)
    rows are the first ``n_eval`` test rows (all 449 with None)."""
    from lowbit import preset
    from lowbit.jobs import quantize_to_dir
    from lowbit.report.evaluate import EvalSet
    from lowbit.zoo import load_data, load_model

    zm, zd = load_model("digits-cnn"), load_data("digits")
    labels = {"model": "digits-cnn", "data": "digits", "recipe": "int8", "calibrator": "percentile"}
    rows = slice(None, n_eval)
    quantize_to_dir(zm.model, zm.example_input, zd.calib, preset("int8"), parent / "digits",
                    EvalSet(zd.eval_inputs[rows], zd.eval_labels[rows], metric_name="accuracy"), labels=labels,
                    threads=1, repeats=1, show_progress=False)
    return parent / "digits"
