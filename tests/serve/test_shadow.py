"""Shadow math against independent references: numpy formulas and ONNX Runtime analysis of the same tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.analysis import metrics
from lowbit.analysis.onnx_tensors import analyze_onnx
from lowbit.serve.codec import InputError, InputSpec, decode_json, decode_raw
from lowbit.serve.config import Threshold
from lowbit.serve.models import load_model_set
from lowbit.serve.shadow import Divergence, layer_label, output_divergence, relative_error

from .helpers import direct_run


def naive_divergence(p: np.ndarray, q: np.ndarray) -> tuple[float, float, float]:
    kls = []
    for rp, rq in zip(p, q):
        lp = rp - np.log(np.sum(np.exp(rp - rp.max()))) - rp.max()
        lq = rq - np.log(np.sum(np.exp(rq - rq.max()))) - rq.max()
        kls.append(float(np.sum(np.exp(lp) * (lp - lq))))
    noise, signal = float(np.sum((p - q) ** 2)), float(np.sum(p ** 2))
    sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    mismatch = float(np.mean([np.argmax(a) != np.argmax(b) for a, b in zip(p, q)]))
    return float(np.mean(kls)), sqnr, mismatch


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (4, 7), elements=st.floats(-8, 8)), arrays(np.float64, (4, 7), elements=st.floats(-1, 1)))
def test_output_divergence_matches_numpy(p, noise):
    q = p + noise
    div = output_divergence(p, q)
    kl, sqnr, mismatch = naive_divergence(p, q)
    assert div.kl == pytest.approx(kl, rel=1e-9, abs=1e-12)
    assert div.sqnr_db == pytest.approx(sqnr, rel=1e-9)
    assert div.top1_mismatch == mismatch and div.rows == 4
    tp, tq = torch.from_numpy(p), torch.from_numpy(q)  # and the project's torch metrics agree
    assert div.kl == pytest.approx(metrics.kl_softmax(tp, tq), rel=1e-9, abs=1e-12)
    assert div.top1_mismatch == pytest.approx(1 - metrics.top1_agreement(tp, tq))


def test_divergence_verdicts():
    t = Threshold(kl_max=0.1, sqnr_min_db=10, top1_mismatch_max=0.5)
    assert not Divergence(0.05, 20, 0.0, 1).is_bad(t)
    assert Divergence(0.2, 20, 0.0, 1).is_bad(t)
    assert Divergence(0.05, 5, 0.0, 1).is_bad(t)
    assert Divergence(0.05, 20, 1.0, 1).is_bad(t)
    assert output_divergence(np.ones((1, 3)), np.array([[1.0, np.nan, 0.0]])).is_bad(Threshold())


def test_layer_errors_match_onnxruntime_analysis(digits_dir, digits_inputs):
    """Per-layer SQNR from the serving sessions equals :func:`analyze_onnx` (numpy over exposed tensors) on one batch."""
    models = load_model_set(digits_dir, "v1", threads=1)
    x = digits_inputs[:5]
    outputs, codes = models.int8_debug.run(x)
    np.testing.assert_array_equal(outputs[0], direct_run(digits_dir / "model_int8.onnx", x))
    fp_out, got = models.reference.run(x, codes)
    np.testing.assert_allclose(fp_out, direct_run(digits_dir / "model_fp32.onnx", x), rtol=1e-5, atol=1e-5)
    rows = analyze_onnx(digits_dir / "model_fp32.onnx", digits_dir / "model_int8.onnx", torch.from_numpy(x),
                        batch_size=16, threads=1)
    expected = {layer_label(r["tensor"]): r["sqnr_db"] for r in rows if r["consumer"] != "graph output"}
    assert set(got) == set(expected) and len(got) == len(models.probes) >= 5
    for layer, (rel, sqnr) in got.items():  # float32 sums in ONNX Runtime vs float64 in the analysis
        assert sqnr == pytest.approx(expected[layer], abs=1e-3), layer
        assert rel == pytest.approx(10 ** (-expected[layer] / 20), rel=1e-3), layer


def test_relative_error_edge_cases():
    assert relative_error(0.0, 4.0) == (0.0, math.inf)
    assert relative_error(1.0, 0.0) == (math.inf, -math.inf)
    rel, sqnr = relative_error(1.0, 100.0)
    assert rel == pytest.approx(0.1) and sqnr == pytest.approx(20.0)


def test_decode_json_and_raw():
    spec = InputSpec((1, 2, 2), max_batch=3)
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    np.testing.assert_array_equal(decode_json(b'{"inputs": %s}' % str(x.tolist()).encode(), spec), x)
    assert decode_json(b'{"inputs": [[[1, 2], [3, 4]]]}', spec).shape == (1, 1, 2, 2)  # one row
    np.testing.assert_array_equal(decode_raw(x.tobytes(), None, None, spec), x)
    cases = [
        (lambda: decode_json(b'{"inputs": [1, 2', spec), 400, "malformed JSON"),
        (lambda: decode_json(b'[1, 2]', spec), 400, '"inputs"'),
        (lambda: decode_json(b'{"inputs": [[1, 2, 3]]}', spec), 422, "shape"),
        (lambda: decode_json(b'{"inputs": [[[1, 2], [3]]]}', spec), 422, "ragged"),
        (lambda: decode_json(b'{"inputs": [[["a", "b"], ["c", "d"]]]}', spec), 422, "float32"),
        (lambda: decode_json(b'{"inputs": [[[true, false], [true, true]]]}', spec), 422, "booleans"),
        (lambda: decode_json(b'{"inputs": [[[1, 2], [3, 4]]], "dtype": "int64"}', spec), 422, "float32"),
        (lambda: decode_json(b'{"inputs": [[[1, NaN], [3, 4]]]}', spec), 422, "NaN"),
        (lambda: decode_json(b'{"inputs": %s}' % str(np.zeros((4, 1, 2, 2)).tolist()).encode(), spec), 413, "max-batch"),
        (lambda: decode_raw(x.tobytes()[:-4], None, None, spec), 422, "whole number of rows"),
        (lambda: decode_raw(x.tobytes(), "3,1,2,2", None, spec), 422, "X-Shape"),
        (lambda: decode_raw(x.tobytes(), "2,1,x", None, spec), 400, "X-Shape"),
        (lambda: decode_raw(x.astype(np.float64).tobytes(), None, "float64", spec), 422, "float32"),
    ]
    for call, status, words in cases:
        with pytest.raises(InputError) as err:
            call()
        assert err.value.status == status and words in err.value.message, err.value.message
