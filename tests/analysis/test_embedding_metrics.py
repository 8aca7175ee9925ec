"""Embedding metrics against naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.analysis.embedding_metrics import mean_cosine, nearest_neighbours, nn_agreement


def _naive_cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_mean_cosine_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    ref, out = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    want = sum(_naive_cos(r, o) for r, o in zip(ref.tolist(), out.tolist())) / 7
    assert mean_cosine(ref, out) == pytest.approx(want, abs=1e-12)
    assert mean_cosine(ref, 3.0 * ref) == pytest.approx(1.0)
    assert mean_cosine(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        mean_cosine(ref, out[:3])


def test_nearest_neighbours_and_agreement_match_a_loop():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(9, 4, generator=g)
    out = ref + 0.3 * torch.randn(9, 4, generator=g)
    rows = ref.tolist()
    want = [max((j for j in range(9) if j != i), key=lambda j: _naive_cos(rows[i], rows[j])) for i in range(9)]
    assert nearest_neighbours(ref).tolist() == want
    nn_ref, nn_out = nearest_neighbours(ref), nearest_neighbours(out)
    assert nn_agreement(ref, out) == pytest.approx(float((nn_ref == nn_out).double().mean()))
    assert nn_agreement(ref, ref * 2) == 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        nearest_neighbours(torch.randn(1, 3))
