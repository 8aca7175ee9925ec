"""The vectorised entropy rule against the plain loop over thresholds (TensorRT's algorithm)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.observers import rules

from .refs import abs_histogram, naive_entropy_kl

N = 200_000


def _data(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(N)
    if kind == "laplace":
        return rng.laplace(size=N)
    if kind == "relu":
        return np.maximum(rng.standard_normal(N), 0.0)
    if kind == "student_t2":
        return rng.standard_t(2, N)
    if kind == "bimodal":
        return np.concatenate([rng.normal(-3, 0.3, N // 2), rng.normal(5, 1.0, N // 2)])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "relu", "student_t2", "bimodal"])
@pytest.mark.parametrize("n_q", [128, 256])
def test_vectorised_kl_equals_naive_loop(kind, n_q):
    """Every candidate's KL matches the loop (the second-order smoothing terms are exact to ~1e-12) and the
    chosen threshold is within one bin of the loop's."""
    counts, width = abs_histogram(_data(kind, 0), bins=2048)
    cands, kl = rules.entropy_divergences(counts, n_q)
    ref_cands, ref_kl = naive_entropy_kl(counts, n_q)
    np.testing.assert_array_equal(cands, ref_cands)
    finite = np.isfinite(ref_kl)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    ours = rules.entropy_threshold(counts, width, n_q)
    ref = ref_cands[int(np.argmin(ref_kl))] * width
    assert abs(ours - ref) <= width


@st.composite
def sparse_histograms(draw):
    """Small histograms with gaps, spikes, empty heads and lone outliers (the corner cases of the chunks)."""
    size = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([0.05, 0.3, 1.0]))
    counts = rng.integers(1, draw(st.sampled_from([2, 50, 10_000])), size) * (rng.random(size) < density)
    if draw(st.booleans()):
        counts[: rng.integers(0, size + 1)] = 0  # empty head: the first candidates keep no mass
    counts[-1] = max(int(counts[-1]), 1)
    return counts.astype(np.int64)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_histograms(), st.sampled_from([1, 2, 3, 8, 16, 64]))
def test_vectorised_kl_equals_naive_loop_on_odd_histograms(counts, n_q):
    cands, kl = rules.entropy_divergences(counts, n_q)
    ref_cands, ref_kl = naive_entropy_kl(counts, n_q)
    np.testing.assert_array_equal(cands, ref_cands)
    finite = np.isfinite(ref_kl)
    np.testing.assert_array_equal(np.isfinite(kl), finite)
    # The smoothing shift e = eps·n_zero/n_nonzero enters to second order; the remainder is
    # O(e³/h²) per bin with h >= 1. The sparsest histograms here (a few counts in 400 bins) reach e ~ 1e-2,
    # i.e. a remainder ~ 1e-7 of a count, so 1e-6 absolute on KL values of order 0.01..1.
    np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-6, atol=1e-6)


def test_kl_is_not_monotonic_so_every_candidate_is_evaluated():
    """The seed's binary search assumes a monotone KL curve; real curves have many local minima."""
    counts, _ = abs_histogram(_data("laplace", 1), bins=2048)
    _, kl = rules.entropy_divergences(counts, 128)
    rises = np.sum(np.diff(kl) > 0)
    falls = np.sum(np.diff(kl) < 0)
    assert rises > 10 and falls > 10


def test_small_histogram_keeps_everything():
    counts = np.array([5, 0, 3, 1])
    assert rules.entropy_threshold(counts, 0.5, 128) == 2.0  # upper edge of the last non-zero bin
    with pytest.raises(ValueError, match="at least one count"):
        rules.entropy_threshold(np.zeros(8), 1.0, 4)


def test_entropy_is_fast():
    """One 2048..4096-bin histogram in a few milliseconds (generous bound for loaded CI machines)."""
    counts, width = abs_histogram(_data("laplace", 2), bins=2048)
    rules.entropy_threshold(counts, width, 128)
    start = time.perf_counter()
    for _ in range(10):
        rules.entropy_threshold(counts, width, 128)
    assert (time.perf_counter() - start) / 10 < 0.05
