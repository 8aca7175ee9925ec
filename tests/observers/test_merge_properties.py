"""``a.merge(b.state())`` equals one observer fed a's stream then b's, for every registered observer.

Exact (bit-identical state) for minmax and the histogram observers (counts, exponent, min, max); EMA and
mean/std merge with closed formulas evaluated in float64, so they agree to a tight tolerance.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.observers import OBSERVERS, make_observer

EXACT = {"minmax", "percentile", "entropy", "mse"}
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def streams(draw, shape=(6, 5)):
    """A list of batches with changing scales (the histogram range grows and shrinks), exact powers of two,
    zeros and bin-edge values, split into a prefix (stream a) and a suffix (stream b)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["normal", "pow2", "zeros", "grid", "relu", "tiny"]))
        scale = 10.0 ** draw(st.integers(-3, 3))
        if kind == "normal":
            x = rng.standard_normal(shape) * scale
        elif kind == "pow2":
            x = np.ldexp(rng.choice([-1.0, 1.0], shape), rng.integers(-6, 6, shape))
        elif kind == "zeros":
            x = np.zeros(shape)
        elif kind == "grid":  # multiples of small powers of two: values on bin edges at many widths
            x = rng.integers(-64, 64, shape) * 2.0 ** draw(st.integers(-10, 2))
        elif kind == "relu":
            x = np.maximum(rng.standard_normal(shape), 0.0) * scale
        else:  # subnormals beside large values: x·2^s underflows on a coarse grid
            x = rng.choice([-1.0, 1.0], shape) * np.ldexp(1.0, rng.integers(-149, -120, shape))
            if draw(st.booleans()):
                x.flat[0] = 1e4 * scale
        batches.append(torch.from_numpy(x.astype(np.float32)))
    cut = draw(st.integers(0, len(batches)))
    return batches[:cut], batches[cut:]


def _fed(name, batches, granularity=PerTensor(), **opts):
    obs = make_observer(name, granularity=granularity, **opts)
    for batch in batches:
        obs.update(batch)
    return obs


def _assert_states_equal(merged: dict, single: dict, exact: bool, scale: float = 1.0) -> None:
    """``scale``: the largest |x| of the stream. A float32 EMA rounds relative to the values it averages,
    so inexact states are compared with ``atol = 4e-6 · scale`` (plus ``rtol = 2e-6``)."""
    assert merged.keys() == single.keys()
    for key in merged:
        if key == "stats" and merged[key] is not None:
            _assert_states_equal(merged[key], single[key], exact, scale)
            continue
        a, b = merged[key], single[key]
        if isinstance(a, torch.Tensor):
            if exact:
                assert torch.equal(a, b), key
            else:
                torch.testing.assert_close(a, b, rtol=2e-6, atol=4e-6 * max(scale, float(b.abs().max())))
        elif isinstance(a, float) and not exact:
            assert np.isclose(a, b, rtol=1e-9, atol=0), key
        else:
            assert a == b, key


def _check(name, a, b, granularity=PerTensor(), **opts):
    merged = _fed(name, a, granularity, **opts)
    merged.merge(_fed(name, b, granularity, **opts).state())
    single = _fed(name, a + b, granularity, **opts)
    scale = max([1.0] + [float(x.abs().max()) for x in a + b])
    _assert_states_equal(merged.state(), single.state(), exact=name in EXACT, scale=scale)
    if single.seen:
        spec = QuantSpec(granularity=granularity)
        for x, y in zip(merged.compute_range(spec), single.compute_range(spec)):
            if name in EXACT:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * scale)


@given(streams(), st.sampled_from(sorted(OBSERVERS)))
@HYP
def test_merge_equals_sequential_per_tensor(split, name):
    _check(name, *split)


@given(streams(), st.sampled_from(["minmax", "ema", "meanstd"]), st.integers(0, 1))
@HYP
def test_merge_equals_sequential_per_channel(split, name, axis):
    _check(name, *split, granularity=PerChannel(axis))


@given(streams(shape=(4, 10)), st.sampled_from([3, 4, 10]))
@HYP
def test_merge_equals_sequential_per_group(split, size):
    _check("minmax", *split, granularity=PerGroup(size, axis=1))


@given(streams(), st.sampled_from([0.0, 0.5, 0.9]))
@HYP
def test_merge_equals_sequential_meanstd_momentum(split, momentum):
    _check("meanstd", *split, momentum=momentum)


@given(streams(), streams())
@HYP
def test_merge_is_associative_for_histograms(s1, s2):
    """(a + b) + c == a + (b + c) bit for bit: the histogram exponent is a function of max|x| only."""
    a, b, c = s1[0] + s1[1], s2[0], s2[1]
    left = _fed("entropy", a)
    left.merge(_fed("entropy", b).state())
    left.merge(_fed("entropy", c).state())
    right_tail = _fed("entropy", b)
    right_tail.merge(_fed("entropy", c).state())
    right = _fed("entropy", a)
    right.merge(right_tail.state())
    _assert_states_equal(left.state(), right.state(), exact=True)
