"""Hostile and careless requests to a real server: never a 5xx, always valid JSON errors (issue 14, items 5-6)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.helpers import Client, serving

EXAMPLES = os.environ.get("LOWBIT_FUZZ_EXAMPLES")  # set it for a longer, randomized run (e.g. 2000)
FUZZ = settings(max_examples=int(EXAMPLES or 120), deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=EXAMPLES is None)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=40)
HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)


def _strict_json(data: bytes):
    """Parse as strict JSON (NaN / Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(data, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(guarded_dir):
    with serving(guarded_dir, shadow_rate=0.2, max_batch=8) as srv:
        client = Client(srv)
        yield client
        client.close()


def _check(status: int, headers: dict, data: bytes) -> None:
    assert status < 500, data[:300]
    if headers.get("content-type", "").startswith("application/json"):
        body = _strict_json(data)
        if status >= 400:
            assert isinstance(body["error"], str) and "\n" not in body["error"] and len(body["error"]) < 400


@FUZZ
@given(body=st.binary(max_size=4096), ctype=st.sampled_from(["application/json", "application/octet-stream",
                                                               "text/plain", "", "application/json; charset=utf-8"]))
def test_random_bodies_never_5xx(server, body, ctype):
    _check(*server.request("POST", "/predict", body, {"Content-Type": ctype} if ctype else {}))


@FUZZ
@given(payload=JSON_VALUES, wrap=st.booleans())
def test_random_json_never_5xx(server, payload, wrap):
    doc = {"inputs": payload} if wrap else payload
    body = json.dumps(doc, allow_nan=True).encode()
    _check(*server.request("POST", "/predict", body, {"Content-Type": "application/json"}))


@FUZZ
@given(shape=HEADER_TEXT, dtype=HEADER_TEXT, n=st.integers(0, 70))
def test_random_raw_headers_never_5xx(server, shape, dtype, n):
    body = np.ones(n, "<f4").tobytes()
    _check(*server.request("POST", "/predict", body, {"Content-Type": "application/octet-stream", "X-Shape": shape,
                                                      "X-Dtype": dtype}))


@FUZZ
@given(dims=st.lists(st.integers(0, 3), min_size=1, max_size=80), scale=st.sampled_from([1.0, 3e38, -3e38, 1e-45]))
def test_random_shapes_and_extreme_values_never_5xx(server, dims, scale):
    n = int(np.prod(dims)) if len(dims) <= 32 else 1
    body = (np.full(min(n, 20000), scale, "<f4")).tobytes()
    _check(*server.request("POST", "/predict", body, {"Content-Type": "application/octet-stream",
                                                      "X-Shape": ",".join(map(str, dims))}))


@pytest.mark.parametrize("depth", [100, 5000, 20000])
def test_deeply_nested_json_is_a_400_with_one_log_line(server, depth, caplog):
    body = ('{"inputs": ' + "[" * depth + "]" * depth + "}").encode()
    assert len(body) < 64 * 1024
    with caplog.at_level(logging.INFO, logger="lowbit"):
        status, headers, data = server.request("POST", "/predict", body, {"Content-Type": "application/json"})
    assert 400 <= status < 500 and "error" in _strict_json(data)
    records = [r for r in caplog.records if r.name.startswith("lowbit")]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()


def test_x_shape_with_65_dimensions_is_a_400(server):
    status, _, data = server.request("POST", "/predict", np.ones(64, "<f4").tobytes(),
                                     {"Content-Type": "application/octet-stream", "X-Shape": ",".join(["1"] * 65)})
    assert status == 400 and "at most 32" in _strict_json(data)["error"]


def test_long_header_values_are_quoted_by_a_bounded_prefix(server):
    status, _, data = server.request("POST", "/predict", b"\0" * 4,
                                     {"Content-Type": "application/octet-stream", "X-Shape": "x" * 5000})
    assert status == 400 and len(_strict_json(data)["error"]) < 200


def test_extreme_finite_inputs_on_fp32_are_a_clear_422_and_never_reach_the_reservoir(guarded_dir, digits_data):
    x = np.full((2, 1, 8, 8), 3e38, np.float32)
    with serving(guarded_dir, precision="fp32", shadow_rate=0.0) as srv:
        client = Client(srv)
        status, _, data = client.request("POST", "/predict", json.dumps({"inputs": x.tolist()}).encode(),
                                         {"Content-Type": "application/json"})
        raw_status, _, _ = client.predict_raw(x)
        ok, _ = client.predict_json(digits_data[0][:3])
        reservoir = client.get_json("/health")["reservoir"]
        client.close()
    assert status == 422 and "not finite" in _strict_json(data)["error"] and raw_status == 422
    assert ok == 200 and reservoir["rows"] == 3 and reservoir["seen"] == 3
