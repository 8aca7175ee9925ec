"""MinMax and EMA observers against torch.ao's MinMax / MovingAverage observers, exactly.

Affine uint8 (quint8, per_tensor_affine / per_channel_affine) uses the same formulas as ``choose_qparams``
(``s = (max − min) / 255`` clamped to float32 eps, ``z = −round(min / s)`` clamped), so scale and zero point
must match bit for bit. For symmetric qint8 torch.ao divides ``amax`` by ``(qmax − qmin) / 2 = 127.5`` and
lowbit by ``qmax = 127``; there the ranges (``min_val`` / ``max_val``) are compared, exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import observer as ao

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.observers import EMAMinMaxObserver, MinMaxObserver

UINT8 = QuantSpec(bits=8, signed=False, symmetric=False)
HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _batches(seed: int, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + 3 * torch.rand((), generator=gen)) + torch.randn((), generator=gen)
            for _ in range(count)]


def _spec(granularity, symmetric=False):
    return QuantSpec(bits=8, signed=symmetric, symmetric=symmetric, granularity=granularity)


def _feed(ours, theirs, batches):
    for batch in batches:
        ours.update(batch)
        theirs(batch)


def _assert_same(ours, theirs, granularity):
    lo, hi = ours.compute_range(_spec(granularity))
    assert torch.equal(lo, theirs.min_val) and torch.equal(hi, theirs.max_val)
    scale, zp = ours.compute_qparams(_spec(granularity))
    ref_scale, ref_zp = theirs.calculate_qparams()
    assert torch.equal(scale, ref_scale.reshape(scale.shape))
    assert torch.equal(zp, ref_zp.to(torch.int64).reshape(zp.shape))


@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 6))
@HYP
def test_minmax_per_tensor(seed, count):
    ours, theirs = MinMaxObserver(), ao.MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    _feed(ours, theirs, _batches(seed, (4, 8, 5), count))
    _assert_same(ours, theirs, PerTensor())


@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 6), momentum=st.sampled_from([0.01, 0.1, 0.5, 1.0]))
@HYP
def test_ema_per_tensor(seed, count, momentum):
    ours = EMAMinMaxObserver(momentum=momentum)
    theirs = ao.MovingAverageMinMaxObserver(averaging_constant=momentum, dtype=torch.quint8,
                                            qscheme=torch.per_tensor_affine)
    _feed(ours, theirs, _batches(seed, (16, 7), count))
    _assert_same(ours, theirs, PerTensor())


@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 5), axis=st.integers(0, 2))
@HYP
def test_minmax_per_channel(seed, count, axis):
    ours = MinMaxObserver(granularity=PerChannel(axis))
    theirs = ao.PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.quint8, qscheme=torch.per_channel_affine)
    _feed(ours, theirs, _batches(seed, (3, 5, 4), count))
    _assert_same(ours, theirs, PerChannel(axis))


@given(seed=st.integers(0, 2**31 - 1), count=st.integers(1, 5), axis=st.integers(0, 2),
       momentum=st.sampled_from([0.01, 0.3]))
@HYP
def test_ema_per_channel(seed, count, axis, momentum):
    ours = EMAMinMaxObserver(granularity=PerChannel(axis), momentum=momentum)
    theirs = ao.MovingAveragePerChannelMinMaxObserver(
        averaging_constant=momentum, ch_axis=axis, dtype=torch.quint8, qscheme=torch.per_channel_affine
    )
    _feed(ours, theirs, _batches(seed, (3, 5, 4), count))
    _assert_same(ours, theirs, PerChannel(axis))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("ema", [False, True])
def test_symmetric_ranges_match(per_channel, ema):
    """torch.ao's symmetric scale is amax / 127.5 (ours amax / 127): compare the ranges they start from."""
    granularity = PerChannel(0) if per_channel else PerTensor()
    qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    if ema:
        ours = EMAMinMaxObserver(granularity=granularity, momentum=0.05)
        cls = ao.MovingAveragePerChannelMinMaxObserver if per_channel else ao.MovingAverageMinMaxObserver
        theirs = cls(averaging_constant=0.05, dtype=torch.qint8, qscheme=qscheme)
    else:
        ours = MinMaxObserver(granularity=granularity)
        cls = ao.PerChannelMinMaxObserver if per_channel else ao.MinMaxObserver
        theirs = cls(dtype=torch.qint8, qscheme=qscheme)
    _feed(ours, theirs, _batches(7, (6, 10), 5))
    lo, hi = ours.compute_range(_spec(granularity, symmetric=True))
    assert torch.equal(lo, theirs.min_val) and torch.equal(hi, theirs.max_val)
    scale, _ = ours.compute_qparams(_spec(granularity, symmetric=True))
    ref_scale, _ = theirs.calculate_qparams()
    torch.testing.assert_close(scale * 127 / 127.5, ref_scale.reshape(scale.shape), rtol=1e-6, atol=0)
