"""End to end: a real uvicorn server on 127.0.0.1, spoken to over HTTP.

Predictions equal a direct ONNX Runtime run; bad input gets a 4xx and leaves other requests and the metrics
alone; a broken INT8 model trips the fuse while every request keeps succeeding; per-layer errors reach
``/metrics``.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from .helpers import Client, break_int8_model, copy_dir, direct_run, serving, wait_for


def _shadow_done(client: Client, n: int) -> bool:
    counts = client.get_json("/health")["shadow"]
    return counts["compared"] + counts["dropped"] >= n and counts["pending"] == 0


def test_predictions_equal_direct_onnxruntime_and_layer_errors_reach_metrics(digits_dir, digits_inputs):
    int8_path = digits_dir / "model_int8.onnx"
    with serving(digits_dir, shadow_rate=1.0) as srv:
        client = Client(srv)
        x = digits_inputs[:5]
        status, body = client.predict_json(x)
        assert status == 200 and body["model"] == "int8" and body["version"] == "v1" and body["shadowed"]
        np.testing.assert_array_equal(np.asarray(body["outputs"], dtype=np.float32), direct_run(int8_path, x))
        status, body = client.predict_json(x[0])  # one row without the batch dim
        assert status == 200 and body["shape"] == [1, 10]
        np.testing.assert_array_equal(np.asarray(body["outputs"], dtype=np.float32), direct_run(int8_path, x[:1]))
        status, headers, raw = client.predict_raw(x[:3])
        assert status == 200 and headers["x-shape"] == "3,10" and headers["x-lowbit-model"] == "int8"
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(3, 10), direct_run(int8_path, x[:3]))
        wait_for(lambda: _shadow_done(client, 3), what="3 shadow comparisons")
        metrics = client.metrics()
        health = client.get_json("/health")
        client.close()
    layers = {dict(k[1])["layer"]: v for k, v in metrics.items() if k[0] == "lowbit_quantization_error"}
    assert len(layers) >= 5 and all(0 < v < 0.2 for v in layers.values()), layers
    assert metrics[("lowbit_request_latency_seconds_count", (("model", "int8"),))] == 3
    assert metrics[("lowbit_shadow_samples_total", (("verdict", "good"),))] == 3
    assert metrics[("lowbit_shadow_rows_total", ())] == 9
    assert metrics[("lowbit_fuse_open", ())] == 0
    assert health["serving"] == "int8" and health["fuse"]["state"] == "closed"
    assert health["reservoir"]["seen"] == 9 and health["reservoir"]["rows"] == 5  # the same 5 rows, kept once


BAD_REQUESTS = [  # (body, headers, status, words in the error, reason label)
    (b'{"inputs": [[1, 2, 3]]}', {"Content-Type": "application/json"}, 422, "shape", "wrong_shape"),
    (b'{"inputs": [[["a"]]]}', {"Content-Type": "application/json"}, 422, "float32", "wrong_dtype"),
    (np.zeros(64, "<f8").tobytes(), {"Content-Type": "application/octet-stream", "X-Dtype": "float64"}, 422, "float32",
     "wrong_dtype"),
    (b'{"inputs": [[[0.1, 0.2,', {"Content-Type": "application/json"}, 400, "malformed JSON", "malformed_json"),
    (np.zeros((5, 1, 8, 8), "<f4").tobytes(), {"Content-Type": "application/octet-stream"}, 413, "exceeds the limit",
     "too_large"),
    (b"x" * 200_000, {"Content-Type": "application/json"}, 413, "exceeds the limit", "too_large"),
    (b"1,2,3", {"Content-Type": "text/csv"}, 415, "application/json", "unsupported_media_type"),
]


def test_bad_input_gets_4xx_and_disturbs_nothing(digits_dir, digits_inputs):
    good_x = digits_inputs[:2]
    expected = direct_run(digits_dir / "model_int8.onnx", good_x)
    n_good = 30
    with serving(digits_dir, shadow_rate=1.0, max_batch=4) as srv:
        good_results: list[tuple[int, dict]] = []

        def send_good():
            c = Client(srv)
            good_results.extend(c.predict_json(good_x) for _ in range(n_good))
            c.close()

        thread = threading.Thread(target=send_good)
        thread.start()
        bad = Client(srv)
        for body, headers, status, words, _ in BAD_REQUESTS:
            got, _, data = bad.request("POST", "/predict", body, headers)
            message = json.loads(data)["error"]
            assert got == status and words in message, (got, message)
        thread.join()
        checker = Client(srv)
        wait_for(lambda: _shadow_done(checker, n_good), what="the shadow to catch up")
        metrics, health = checker.metrics(), checker.get_json("/health")
        checker.close()
        bad.close()
    assert len(good_results) == n_good
    for status, body in good_results:
        assert status == 200
        np.testing.assert_array_equal(np.asarray(body["outputs"], dtype=np.float32), expected)
    assert metrics[("lowbit_request_latency_seconds_count", (("model", "int8"),))] == n_good
    assert metrics[("lowbit_requests_total", (("model", "int8"),))] == n_good
    assert metrics[("lowbit_shadow_samples_total", (("verdict", "good"),))] == n_good
    assert metrics[("lowbit_shadow_samples_total", (("verdict", "bad"),))] == 0
    rejected = {dict(k[1])["reason"]: v for k, v in metrics.items() if k[0] == "lowbit_rejected_requests_total"}
    want: dict[str, int] = {}
    for *_, reason in BAD_REQUESTS:
        want[reason] = want.get(reason, 0) + 1
    assert rejected == want
    assert health["reservoir"]["seen"] == 2 * n_good and health["fuse"]["consecutive_bad"] == 0


def test_broken_int8_trips_the_fuse_and_no_request_fails(digits_dir, digits_inputs, tmp_path):
    folder = copy_dir(digits_dir, tmp_path / "broken")
    break_int8_model(folder)
    x = digits_inputs[:4]
    assert np.abs(direct_run(folder / "model_int8.onnx", x) - direct_run(folder / "model_fp32.onnx", x)).max() > 1
    per_thread = 25
    with serving(folder, shadow_rate=1.0, max_bad=3, recover_good=50) as srv:
        answers: list[list[tuple[int, dict]]] = [[], []]

        def send(i: int) -> None:
            c = Client(srv)
            answers[i].extend(c.predict_json(x) for _ in range(per_thread))
            c.close()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client = Client(srv)
        wait_for(lambda: client.get_json("/health")["serving"] == "fp32", what="the fuse to trip")
        status, after = client.predict_json(x)
        metrics, health = client.metrics(), client.get_json("/health")
        client.close()
    flat = [a for per in answers for a in per]
    assert len(flat) == 2 * per_thread and all(status == 200 for status, _ in flat)
    served = {body["model"] for _, body in flat}
    assert "int8" in served  # answered by INT8 until the fuse tripped (FP32 after, when the trip came in time)
    assert status == 200 and after["model"] == "fp32"
    np.testing.assert_allclose(np.asarray(after["outputs"], dtype=np.float32), direct_run(folder / "model_fp32.onnx", x),
                               rtol=1e-6, atol=1e-6)
    assert health["fuse"]["state"] == "open" and health["fuse"]["trips"] == 1
    assert metrics[("lowbit_fuse_open", ())] == 1 and metrics[("lowbit_fuse_trips_total", ())] == 1
    assert metrics[("lowbit_shadow_samples_total", (("verdict", "bad"),))] >= 3
    assert metrics[("lowbit_shadow_last", (("measure", "sqnr_db"),))] < 8


@pytest.mark.parametrize("path,method", [("/health", "POST"), ("/nope", "GET")])
def test_unknown_routes_and_methods(digits_dir, path, method):
    with serving(digits_dir, shadow_rate=0.0) as srv:
        client = Client(srv)
        status, _, _ = client.request(method, path)
        client.close()
    assert status in (404, 405)
