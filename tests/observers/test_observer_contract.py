"""The shared contract: registry, errors, NaN policy, reset, state / load, granularity handling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lowbit.core import PerChannel, PerGroup, QuantSpec, expand_qparams
from lowbit.observers import (
    OBSERVERS,
    EMAMinMaxObserver,
    EntropyObserver,
    HistogramObserver,
    MeanStdObserver,
    MinMaxObserver,
    PercentileObserver,
    make_observer,
)

NAMES = ["minmax", "ema", "meanstd", "percentile", "entropy", "mse"]
SPEC = QuantSpec()


def test_registry_names():
    assert sorted(OBSERVERS) == sorted(NAMES)
    for name in NAMES:
        obs = make_observer(name, name="layer")
        assert isinstance(obs, OBSERVERS[name]) and obs.calibrator == name and obs.name == "layer"


def test_unknown_calibrator_lists_valid_names():
    with pytest.raises(ValueError, match="unknown calibrator 'kl'.*entropy, meanstd, minmax, mse, percentile"):
        make_observer("kl")


@pytest.mark.parametrize("name", NAMES)
def test_saw_no_data(name):
    obs = make_observer(name, name="features.3.conv")
    for call in (obs.compute_range, obs.compute_qparams):
        with pytest.raises(RuntimeError, match="observer 'features.3.conv' saw no data"):
            call(SPEC)
    obs.update(torch.empty(0))
    assert obs.seen == 0
    with pytest.raises(RuntimeError, match="saw no data"):
        obs.compute_range(SPEC)


@pytest.mark.parametrize("name", NAMES)
def test_nan_raises_naming_the_observer(name):
    obs = make_observer(name, name="features.3.conv")
    x = torch.randn(100)
    x[:10] = float("nan")
    x[10] = float("inf")
    x[11] = -float("inf")
    with pytest.raises(ValueError, match=r"observer 'features.3.conv' got 12 NaN/Inf values"):
        obs.update(x)
    assert obs.seen == 0


@pytest.mark.parametrize("name", NAMES)
def test_nan_ignore_counts_and_skips(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=gen)
    dirty = x.clone()
    dirty[0, :3] = float("nan")
    dirty[2, 7] = float("inf")
    ignoring = make_observer(name, nan_policy="ignore")
    clean = make_observer(name, nan_policy="ignore")
    ignoring.update(dirty)
    clean.update(dirty[torch.isfinite(dirty)])
    assert ignoring.nan_count == 4 and ignoring.seen == 196
    assert clean.nan_count == 0 and clean.seen == 196
    for a, b in zip(ignoring.compute_range(SPEC), clean.compute_range(SPEC)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ignoring.update(torch.full((5,), float("nan")))  # nothing finite: only counted
    assert ignoring.nan_count == 9 and ignoring.seen == 196


def test_nan_ignore_per_channel_minmax():
    x = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 4.0, 0.5]])
    obs = MinMaxObserver(granularity=PerChannel(0), nan_policy="ignore")
    obs.update(x)
    lo, hi = obs.compute_range(QuantSpec(granularity=PerChannel(0)))
    assert lo.tolist() == [-2.0, 0.5] and hi.tolist() == [1.0, 4.0]


def test_bad_options():
    with pytest.raises(ValueError, match="nan_policy"):
        MinMaxObserver(nan_policy="skip")
    with pytest.raises(ValueError, match="supports granularity"):
        EMAMinMaxObserver(granularity=PerGroup(4))
    with pytest.raises(ValueError, match="supports granularity"):
        EntropyObserver(granularity=PerChannel(0))
    with pytest.raises(ValueError, match="momentum"):
        EMAMinMaxObserver(momentum=0.0)
    with pytest.raises(ValueError, match="momentum"):
        MeanStdObserver(momentum=1.0)
    with pytest.raises(ValueError, match="power of two"):
        HistogramObserver(bins=1000)
    with pytest.raises(ValueError, match="rule"):
        HistogramObserver(rule="kl")
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=101)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)  # bit widths are QuantSpec's job


def test_spec_granularity_must_match():
    obs = MinMaxObserver(granularity=PerChannel(0))
    obs.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="spec asks for"):
        obs.compute_range(QuantSpec())


@pytest.mark.parametrize("name", NAMES)
def test_reset_state_pickle_and_load(name):
    obs = make_observer(name, name="a")
    gen = torch.Generator().manual_seed(1)
    obs.update(torch.randn(1000, generator=gen))
    obs.update(3 * torch.randn(1000, generator=gen))
    state = pickle.loads(pickle.dumps(obs.state()))
    copy = make_observer(name, name="b")
    copy.load_state(state)
    assert copy.seen == obs.seen == 2000
    for a, b in zip(copy.compute_qparams(SPEC), obs.compute_qparams(SPEC)):
        assert torch.equal(a, b)
    obs.reset()
    assert obs.seen == 0 and obs.nan_count == 0
    with pytest.raises(RuntimeError, match="saw no data"):
        obs.compute_range(SPEC)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (MinMaxObserver(), EMAMinMaxObserver()),
        (MinMaxObserver(), MinMaxObserver(granularity=PerChannel(0))),
        (MinMaxObserver(granularity=PerChannel(0)), MinMaxObserver(granularity=PerChannel(1))),
        (EMAMinMaxObserver(momentum=0.1), EMAMinMaxObserver(momentum=0.2)),
        (MeanStdObserver(), MeanStdObserver(momentum=0.9)),
        (EntropyObserver(), PercentileObserver()),
        (EntropyObserver(bins=1024), EntropyObserver(bins=2048)),
    ],
)
def test_merge_incompatible_raises(a, b):
    a.update(torch.randn(4, 4))
    b.update(torch.randn(4, 4))
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(b.state())
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge({"not": "a state"})


def test_merge_shape_mismatch_raises():
    a, b = MinMaxObserver(granularity=PerChannel(0)), MinMaxObserver(granularity=PerChannel(0))
    a.update(torch.randn(3, 4))
    b.update(torch.randn(5, 4))
    with pytest.raises(ValueError, match="shape"):
        a.merge(b.state())
    with pytest.raises(ValueError, match="shape"):
        a.update(torch.randn(5, 4))


@pytest.mark.parametrize("shape", [(6, 10), (6, 8), (3, 5, 7)])
@pytest.mark.parametrize("size", [1, 4, 16])
def test_minmax_per_group(shape, size):
    """Per-group min / max in expand_qparams' layout; a ragged tail group is not padded with zeros."""
    gen = torch.Generator().manual_seed(2)
    granularity = PerGroup(size, axis=-1)
    obs = MinMaxObserver(granularity=granularity)
    batches = [torch.randn(shape, generator=gen) + 3.0 for _ in range(3)]  # all positive: zero padding would show
    for batch in batches:
        obs.update(batch)
    lo, hi = obs.compute_range(QuantSpec(granularity=granularity))
    data = torch.stack(batches)
    n = shape[-1]
    groups = -(-n // size)
    assert lo.shape == (*shape[:-1], groups)
    for g in range(groups):
        chunk = data[..., g * size : min((g + 1) * size, n)]
        assert torch.equal(lo[..., g], chunk.amin(dim=(0, -1)))
        assert torch.equal(hi[..., g], chunk.amax(dim=(0, -1)))
    scale, _ = obs.compute_qparams(QuantSpec(granularity=granularity))
    assert expand_qparams(scale, torch.Size(shape), granularity).shape == torch.Size(shape)


def test_constant_and_zero_data():
    for name in NAMES:
        obs = make_observer(name)
        obs.update(torch.zeros(64))
        scale, zp = obs.compute_qparams(SPEC)
        assert float(scale) == 1.0 and int(zp) == 0, name
        obs = make_observer(name)
        obs.update(torch.full((64,), 2.5))
        lo, hi = obs.compute_range(SPEC)
        assert float(hi) == pytest.approx(2.5), name


def test_histogram_is_per_tensor_only_and_meanstd_per_channel():
    obs = MeanStdObserver(granularity=PerChannel(1), k=2.0)
    x = torch.randn(100, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    obs.update(x.float())
    lo, hi = obs.compute_range(QuantSpec(granularity=PerChannel(1)))
    xs = x.float().double().numpy()
    mean, std = xs.mean(0), xs.std(0)
    np.testing.assert_allclose(hi.numpy(), np.minimum(mean + 2 * std, xs.max(0)), rtol=1e-6)
    np.testing.assert_allclose(lo.numpy(), np.maximum(mean - 2 * std, xs.min(0)), rtol=1e-6)
