"""Mean ± kσ observer: exact streaming moments and the seed's EMA online calibrator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.core import PerChannel, QuantSpec
from lowbit.observers import MeanStdObserver

from .refs import seed_online_calibrator


def _batches(seed: int, count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(rng.integers(1, 5000)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).astype(np.float32)
            for _ in range(count)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1.0, 3.0])
def test_exact_moments_over_all_elements(seed, k):
    batches = _batches(seed)
    obs = MeanStdObserver(k=k)
    for batch in batches:
        obs.update(torch.from_numpy(batch))
    data = np.concatenate(batches).astype(np.float64)
    mean, std = obs.mean_std()
    # batch moments come from torch.var_mean on float32 data (float32 rounding), combined in float64
    assert abs(float(mean) - data.mean()) <= 1e-6 * (abs(data.mean()) + data.std())
    np.testing.assert_allclose(float(std), data.std(), rtol=1e-6)
    lo, hi = obs.compute_range(QuantSpec())
    np.testing.assert_allclose(float(lo), max(data.mean() - k * data.std(), data.min()), rtol=1e-6)
    np.testing.assert_allclose(float(hi), min(data.mean() + k * data.std(), data.max()), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
def test_momentum_matches_the_seed_online_calibrator(seed, beta):
    batches = _batches(seed)
    obs = MeanStdObserver(k=3.0, momentum=beta)
    for batch in batches:
        obs.update(torch.from_numpy(batch))
    ref_lo, ref_hi = seed_online_calibrator(batches, beta, 3.0)
    data = np.concatenate(batches)
    lo, hi = obs.compute_range(QuantSpec())
    np.testing.assert_allclose(float(lo), max(ref_lo, data.min()), rtol=1e-5)
    np.testing.assert_allclose(float(hi), min(ref_hi, data.max()), rtol=1e-5)


def test_range_is_clipped_to_the_observed_extremes():
    obs = MeanStdObserver(k=10.0)
    obs.update(torch.tensor([0.0, 1.0, 2.0]))
    lo, hi = obs.compute_range(QuantSpec())
    assert float(lo) == 0.0 and float(hi) == 2.0


def test_large_offset_and_many_slabs():
    """Two-pass moments per slab: no cancellation for a mean 10^5 times the spread; ragged last slab."""
    rng = np.random.default_rng(5)
    x = (1000.0 + 0.01 * rng.standard_normal((3, 1_200_001))).astype(np.float32)
    x[1] -= 2000.0
    obs = MeanStdObserver(granularity=PerChannel(0))
    obs.update(torch.from_numpy(x))
    mean, std = obs.mean_std()
    data = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), data.mean(axis=1), rtol=1e-7)
    np.testing.assert_allclose(std.numpy(), data.std(axis=1), rtol=2e-5)  # float32 slab means: ~1e-6..1e-5
