"""Error metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.analysis import metrics


def test_sqnr_db_hand_computed():
    ref = torch.tensor([3.0, 4.0])  # signal 25
    out = torch.tensor([3.0, 3.5])  # noise 0.25
    assert metrics.sqnr_db(ref, out) == pytest.approx(20.0, abs=1e-12)
    assert metrics.sqnr_db(torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([1.1, -1.1], dtype=torch.float64)) == pytest.approx(
        10 * math.log10(2 / 0.02), rel=1e-12)


def test_sqnr_db_limits():
    x = torch.randn(10)
    assert metrics.sqnr_db(x, x.clone()) == math.inf
    assert metrics.sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert metrics.sqnr_db(x, torch.zeros(10)) == pytest.approx(0.0, abs=1e-12)


def test_sqnr_db_uses_double_precision():
    ref = torch.full((1000,), 1.0e4)
    out = ref + torch.tensor(1e-3).repeat(1000)
    expected = 10 * math.log10(1000 * 1e8 / (1000 * float(np.float32(1.0e4 + 1e-3) - 1.0e4) ** 2))
    assert metrics.sqnr_db(ref, out) == pytest.approx(expected, rel=1e-9)


def test_cosine_hand_computed():
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert metrics.cosine(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[2.0, 4.0], [6.0, 8.0]])) == pytest.approx(1.0)
    assert metrics.cosine(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(-1.0)
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == 0.0
    assert metrics.cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert metrics.cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_mse_hand_computed():
    assert metrics.mse(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 3.0, 5.0])) == pytest.approx(5 / 4)
    assert metrics.mse(torch.ones(2, 2), torch.ones(2, 2)) == 0.0


def test_kl_softmax_hand_computed():
    ref = torch.tensor([[0.0, 0.0]])           # p = (0.5, 0.5)
    out = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # q = (0.75, 0.25)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert metrics.kl_softmax(ref, out) == pytest.approx(expected, rel=1e-12)
    # mean over rows, invariant to a constant shift of the logits
    two = metrics.kl_softmax(torch.cat([ref, ref + 7]), torch.cat([out, torch.zeros(1, 2)]))
    assert two == pytest.approx(expected / 2, rel=1e-12)
    x = torch.randn(5, 10)
    assert metrics.kl_softmax(x, x + 3.0) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_softmax(x, x.flip(-1)) > 0


def test_kl_softmax_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(a), softmax(b)
    expected = float(np.mean(np.sum(p * np.log(p / q), axis=-1)))
    assert metrics.kl_softmax(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-10)


def test_top1_agreement_and_accuracy():
    ref = torch.tensor([[1.0, 2.0, 0.0], [5.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    out = torch.tensor([[0.0, 9.0, 0.0], [1.0, 5.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert metrics.top1_agreement(ref, out) == 0.5
    assert metrics.top1_agreement(ref, ref) == 1.0
    assert metrics.accuracy(ref, torch.tensor([1, 0, 0, 0])) == 0.75


def test_hist_overlap_hand_computed():
    ref = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = torch.tensor([2.0, 5.0, 0.0, 3.0])
    assert metrics.hist_overlap(ref, out) == pytest.approx((2 + 3 + 0 + 1) / 10)
    assert metrics.hist_overlap(ref, ref) == 1.0
    assert metrics.hist_overlap(ref, torch.zeros(4)) == 0.0
    assert metrics.hist_overlap(torch.zeros(4), out) == 1.0
    assert metrics.hist_overlap(torch.tensor([1, 1], dtype=torch.int64), torch.tensor([0, 7])) == 0.5


def test_metrics_return_python_floats():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    for fn in (metrics.sqnr_db, metrics.cosine, metrics.mse, metrics.kl_softmax, metrics.top1_agreement):
        assert type(fn(a, b)) is float
