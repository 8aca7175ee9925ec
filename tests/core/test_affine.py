"""Affine quantization: choose_qparams, quantize / dequantize, expand_qparams / group_view.

References: numpy's transcription of the ONNX QuantizeLinear / DequantizeLinear definition, ONNX Runtime
itself (QuantizeLinear → DequantizeLinear graphs, per-tensor, per-axis and opset-21 blocked), torch's
fake_quantize_per_{tensor,channel}_affine and torch.ao's MinMaxObserver.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lowbit.core import (
    SCALE_EPS,
    PerChannel,
    PerGroup,
    PerTensor,
    choose_qparams,
    dequantize,
    expand_qparams,
    fake_quantize,
    group_view,
    qrange,
    quantize,
    quantize_dequantize,
    reduce_dims,
)

from .refs import ONNX_QTYPES, np_qdq, np_quantize, ort_qdq
from .strategies import any_scales, pow2_scales, qcases, qranges

F32 = np.float32
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HYP_FAST = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def qdq(x, s, z, qmin, qmax):
    """Our quantize → dequantize on numpy inputs, numpy output."""
    return quantize_dequantize(t(x), t(s), t(z, torch.int64), qmin, qmax).numpy()


def bits_equal(a, b) -> bool:
    """Same shape and exactly equal values (atol=0; +0.0 and -0.0 count as equal)."""
    a, b = np.asarray(a, F32), np.asarray(b, F32)
    return a.shape == b.shape and bool(np.all(a == b))


# --------------------------------------------------------------------------------------------- choose_qparams

range_ends = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.floats(-1e-30, 1e-30).map(lambda v: float(F32(v))),
    st.just(0.0),
)


@HYP_FAST
@given(a=range_ends, b=range_ends, q=qranges(), symmetric=st.booleans())
def test_choose_qparams_zero_is_exact(a, b, q, symmetric):
    _, qmin, qmax = q
    lo, hi = min(a, b), max(a, b)
    s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric)
    assert s.dtype == torch.float32 and z.dtype == torch.int64
    assert s.shape == () and z.shape == ()
    assert torch.isfinite(s) and s > 0
    assert qmin <= int(z) <= qmax
    if symmetric:
        assert int(z) == 0
    zero = torch.zeros(5)
    q0 = quantize(zero, s, z, qmin, qmax)
    assert torch.equal(q0, torch.full((5,), int(z), dtype=torch.int64))
    assert torch.equal(dequantize(q0, s, z), zero)
    assert torch.equal(quantize_dequantize(zero, s, z, qmin, qmax), zero)
    assert torch.equal(fake_quantize(zero, s, z, qmin, qmax), zero)
    # the widened range [min(lo, 0), max(hi, 0)] is covered up to half a step (zero-point rounding)
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    sv = float(s)
    slack = 2.0**-22 * max(abs(lo0), abs(hi0)) + 1e-45
    if symmetric and qmin == 0:
        ends = [hi0]  # unsigned symmetric codes cannot hold negatives
    else:
        ends = [lo0, hi0]
    for e in ends:
        err = abs(float(quantize_dequantize(torch.tensor(e), s, z, qmin, qmax)) - e)
        assert err <= sv / 2 + slack
    if symmetric and qmin < 0 and qmin == -qmax:  # narrow signed: +-amax exactly on the end codes
        amax = max(-lo0, hi0)
        if sv > SCALE_EPS:
            assert abs(float(quantize_dequantize(torch.tensor(amax), s, z, qmin, qmax)) - amax) <= slack


@HYP_FAST
@given(a=range_ends, b=range_ends, q=qranges(), symmetric=st.booleans())
def test_choose_qparams_closed_form(a, b, q, symmetric):
    """Compare with the formulas evaluated in float64 (then rounded to float32)."""
    _, qmin, qmax = q
    lo, hi = min(a, b, 0.0), max(a, b, 0.0)
    s, z = choose_qparams(torch.tensor(min(a, b)), torch.tensor(max(a, b)), qmin, qmax, symmetric)
    if lo == hi == 0.0:
        assert float(s) == 1.0
        return
    if symmetric:
        ref = max(-lo, hi) / qmax
    else:
        ref = (hi - lo) / (qmax - qmin)
    ref = max(ref, float(SCALE_EPS))
    assert float(s) == pytest.approx(ref, rel=2**-22)
    if not symmetric:
        zref = qmin - np.round(np.float64(F32(lo)) / np.float64(float(s)))
        # float32 vs float64 division can only disagree right at a .5 tie of lo / s
        assert abs(int(z) - min(max(zref, qmin), qmax)) <= 1


def test_choose_qparams_all_zero_range():
    for qmin, qmax in [qrange(8, True), qrange(8, False), qrange(4, True, True), qrange(16, False), qrange(2, True)]:
        for symmetric in (True, False):
            s, z = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), qmin, qmax, symmetric)
            assert float(s) == 1.0
            assert int(z) == min(max(0, qmin), qmax) and qmin <= int(z) <= qmax
            x = torch.zeros(3, 4)
            assert torch.equal(quantize_dequantize(x, s, z, qmin, qmax), x)


@pytest.mark.parametrize("c", [0.0, 1.0, -1.0, 3.75, -1234.5, 1e-30, -1e-30, 1e-42, 1e30, -1e30, 7e37])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_choose_qparams_constant_tensor(c, bits, symmetric, signed):
    qmin, qmax = qrange(bits, signed)
    x = torch.full((4, 5), c, dtype=torch.float32)
    s, z = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    assert torch.isfinite(s) and float(s) > 0
    assert qmin <= int(z) <= qmax
    y = quantize_dequantize(x, s, z, qmin, qmax)
    assert torch.isfinite(y).all()
    assert float(quantize_dequantize(torch.tensor(0.0), s, z, qmin, qmax)) == 0.0
    cf = float(F32(c))
    if symmetric and not signed and cf < 0:
        assert torch.equal(y, torch.zeros_like(x))  # clipped to the only representable side
    else:
        assert torch.all((y - x).abs() <= float(s) / 2 + 2.0**-22 * abs(cf))


@HYP_FAST
@given(
    pairs=st.lists(st.tuples(range_ends, range_ends), min_size=1, max_size=12),
    q=qranges(),
    symmetric=st.booleans(),
)
def test_choose_qparams_per_channel_is_elementwise(pairs, q, symmetric):
    _, qmin, qmax = q
    pairs = [(min(a, b), max(a, b)) for a, b in pairs]
    pairs.append((0.0, 0.0))  # an all-zero channel among the others
    lo = torch.tensor([p[0] for p in pairs])
    hi = torch.tensor([p[1] for p in pairs])
    s, z = choose_qparams(lo, hi, qmin, qmax, symmetric)
    assert s.shape == lo.shape and z.shape == lo.shape
    for i, (a, b) in enumerate(pairs):
        si, zi = choose_qparams(torch.tensor(a), torch.tensor(b), qmin, qmax, symmetric)
        assert s[i] == si and z[i] == zi
    assert float(s[-1]) == 1.0


def test_choose_qparams_accepts_python_floats_and_2d():
    s, z = choose_qparams(-1.0, 3.0, 0, 255, False)
    s2, z2 = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert s == s2 and z == z2
    lo = torch.tensor([[-1.0, 0.0], [-2.0, 5.0]])
    s, z = choose_qparams(lo, lo.abs() + 1, -128, 127, False)
    assert s.shape == (2, 2) and z.shape == (2, 2)


# torch.ao observers with the same quant range: (dtype, qmin, qmax)
AO_CONFIGS = [
    (torch.quint8, 0, 255),
    (torch.qint8, -128, 127),
    (torch.qint8, -127, 127),  # narrow int8
    (torch.qint8, -8, 7),  # int4 carried in qint8
    (torch.quint8, 0, 15),  # uint4
    (torch.qint8, -2, 1),  # int2
    (torch.qint32, -32768, 32767),  # int16
]


def _ao_observer(cls, dtype, qmin, qmax, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import observer

        return getattr(observer, cls)(dtype=dtype, quant_min=qmin, quant_max=qmax, **kw)


@HYP_FAST
@given(a=range_ends, b=range_ends, cfg=st.sampled_from(AO_CONFIGS))
def test_choose_qparams_matches_torch_ao_minmax_observer(a, b, cfg):
    dtype, qmin, qmax = cfg
    assume(not (a == 0.0 and b == 0.0))  # all-zero range: torch.ao gives scale=eps, lowbit gives 1 (see below)
    obs = _ao_observer("MinMaxObserver", dtype, qmin, qmax, qscheme=torch.per_tensor_affine)
    x = torch.tensor([a, b], dtype=torch.float32)
    obs(x)
    ref_s, ref_z = obs.calculate_qparams()
    s, z = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric=False)
    assert s.item() == ref_s.item()  # bit-exact float32
    assert z.item() == ref_z.item()


@pytest.mark.parametrize("cfg", AO_CONFIGS, ids=lambda c: f"{c[0]}[{c[1]},{c[2]}]")
@pytest.mark.parametrize("seed", range(3))
def test_choose_qparams_matches_torch_ao_per_channel_observer(cfg, seed):
    dtype, qmin, qmax = cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 7, 3, generator=g) * torch.logspace(-6, 4, 16).reshape(16, 1, 1)
    x[3] = x[3].abs()  # a non-negative channel
    x[5] = -x[5].abs()  # a non-positive channel
    x[7] = 2.5  # a constant channel
    obs = _ao_observer("PerChannelMinMaxObserver", dtype, qmin, qmax, ch_axis=0, qscheme=torch.per_channel_affine)
    obs(x)
    ref_s, ref_z = obs.calculate_qparams()
    flat = x.reshape(16, -1)
    s, z = choose_qparams(flat.amin(1), flat.amax(1), qmin, qmax, symmetric=False)
    assert torch.equal(s, ref_s.float())
    assert torch.equal(z, ref_z.to(torch.int64))


def test_all_zero_range_differs_from_torch_ao_by_design():
    """torch.ao returns scale=eps for an all-zero range; lowbit returns 1 (both represent 0 exactly)."""
    obs = _ao_observer("MinMaxObserver", torch.quint8, 0, 255, qscheme=torch.per_tensor_affine)
    obs(torch.zeros(4))
    ref_s, _ = obs.calculate_qparams()
    s, _ = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 0, 255, False)
    assert ref_s.item() == pytest.approx(float(SCALE_EPS)) and s.item() == 1.0


# --------------------------------------------------------------------------------- quantize / dequantize


@HYP_FAST
@given(case=qcases())
def test_quantize_matches_onnx_definition_numpy(case):
    x, s, z, qmin, qmax = case["x"], case["scale"], case["zp"], case["qmin"], case["qmax"]
    q = quantize(t(x), t(s), t(z, torch.int64), qmin, qmax)
    assert q.dtype == torch.int64
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    np.testing.assert_array_equal(q.numpy(), np_quantize(x, s, z, qmin, qmax))
    assert bits_equal(qdq(x, s, z, qmin, qmax), np_qdq(x, s, z, qmin, qmax))


@HYP_FAST
@given(case=qcases())
def test_dequantize_of_quantize_is_quantize_dequantize(case):
    x, s, z, qmin, qmax = t(case["x"]), t(case["scale"]), t(case["zp"], torch.int64), case["qmin"], case["qmax"]
    ref = dequantize(quantize(x, s, z, qmin, qmax), s, z)
    assert ref.dtype == torch.float32
    assert torch.equal(quantize_dequantize(x, s, z, qmin, qmax), ref)
    # fake_quantize's forward (with and without autograd) is the same function
    assert torch.equal(fake_quantize(x, s, z, qmin, qmax), ref)
    xg = x.clone().requires_grad_(True)
    assert torch.equal(fake_quantize(xg, s, z.float(), qmin, qmax).detach(), ref)
    sg = s.clone().requires_grad_(True)
    assert torch.equal(fake_quantize(x, sg, z, qmin, qmax).detach(), ref)


ORT_PER_TENSOR = [(q, o) for q in ONNX_QTYPES for o in (13, 21) if o >= ONNX_QTYPES[q][1]]


@pytest.mark.parametrize("qtype", [q for q in ONNX_QTYPES if ONNX_QTYPES[q][1] > 13])
def test_onnxruntime_narrow_types_need_opset_21(qtype):
    """ORT 1.32 runs int4/uint4/int16/uint16 Q/DQ from opset 21 (covered below) and rejects them at 13."""
    x = np.array([[0.3, -5.0, 5.0]], F32)
    with pytest.raises(Exception, match="(?i)type"):
        ort_qdq(x, 0.5, 0, qtype, 13)
    _, _, signed, bits = ONNX_QTYPES[qtype]
    qmin, qmax = qrange(bits, signed)
    assert bits_equal(ort_qdq(x, 0.5, 0, qtype, 21), np_qdq(x, 0.5, 0, qmin, qmax))


@pytest.mark.parametrize("qtype,opset", ORT_PER_TENSOR)
def test_onnxruntime_per_tensor(qtype, opset):
    elem, min_opset, signed, bits = ONNX_QTYPES[qtype]

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=qcases(bits=[bits], signed=signed, narrow=False, n_max=64))
    def check(case):
        x, s, z, qmin, qmax = case["x"], case["scale"], case["zp"], case["qmin"], case["qmax"]
        ref = ort_qdq(x[None, :], s, z, qtype, opset)[0]
        assert bits_equal(qdq(x, s, z, qmin, qmax), ref)
        assert bits_equal(fake_quantize(t(x), t(s), t(z), qmin, qmax).numpy(), ref)

    check()


@pytest.mark.parametrize("qtype", list(ONNX_QTYPES))
def test_onnxruntime_ties_and_saturation(qtype):
    """Exact .5 ties round half to even; +-inf and huge values saturate; arbitrary scales included."""
    _, _, signed, bits = ONNX_QTYPES[qtype]
    qmin, qmax = qrange(bits, signed)
    rng = np.random.default_rng(bits + signed)
    scales = [0.5, 2.0**-7, 1.0, 0.1, 0.0123, 3.3, float(F32(1 / 3))]
    ks = np.arange(qmin - 3, qmax + 3) if bits <= 8 else rng.integers(qmin - 3, qmax + 3, 4000)
    for s in scales:
        s32 = F32(s)
        for z in sorted({qmin, 0 if qmin == 0 else -1, (qmin + qmax) // 2, qmax}):
            k = ks - z
            x = (k.astype(F32) + F32(0.5)) * s32
            exact_tie = (x / s32) == (k.astype(F32) + F32(0.5))
            x = np.concatenate([x, F32([np.inf, -np.inf, 1e38, -1e38, 0.0, -0.0])])
            ours = qdq(x, s32, z, qmin, qmax)
            assert bits_equal(ours, ort_qdq(x[None, :], s32, z, qtype)[0])
            q = np_quantize(x, s32, z, qmin, qmax)
            np.testing.assert_array_equal(quantize(t(x), t(s32), t(z, torch.int64), qmin, qmax).numpy(), q)
            # ties: unsaturated codes with x / s exactly k + .5 are even (q - z is even <=> round to even)
            tie_codes = q[: len(k)][exact_tie] - z
            inner = (tie_codes + z > qmin) & (tie_codes + z < qmax)
            assert exact_tie.sum() > 0
            assert np.all(tie_codes[inner] % 2 == 0)
            assert q[-6] == qmax and q[-5] == qmin and q[-4] == qmax and q[-3] == qmin
            assert ours[-2] == 0.0 and ours[-1] == 0.0


@pytest.mark.parametrize("qtype,opset", [("int8", 13), ("uint8", 13), ("int8", 21), ("uint16", 21), ("int16", 21),
                                         ("int4", 21), ("uint4", 21)])
def test_onnxruntime_per_channel(qtype, opset):
    _, _, signed, bits = ONNX_QTYPES[qtype]

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data):
        ndim = data.draw(st.integers(1, 4))
        shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
        axis = data.draw(st.integers(-ndim, ndim - 1))
        _, qmin, qmax = data.draw(qranges([bits], signed, narrow=False))
        c = shape[axis]
        scales = np.asarray(data.draw(st.lists(st.one_of(any_scales(), pow2_scales()), min_size=c, max_size=c)), F32)
        zps = np.asarray(data.draw(st.lists(st.integers(qmin, qmax), min_size=c, max_size=c)), np.int64)
        seed = data.draw(st.integers(0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        view = [1] * ndim
        view[axis] = c
        span = (qmax - qmin + 6) * scales.reshape(view)
        x = ((rng.random(shape) - 0.5) * span).astype(F32)
        # plant exact ties on the channel grids
        k = rng.integers(qmin - 2, qmax + 2, shape) - zps.reshape(view)
        tie = (k + 0.5).astype(F32) * np.broadcast_to(scales.reshape(view), shape)
        x = np.where(rng.random(shape) < 0.3, tie, x).astype(F32)
        g = PerChannel(axis)
        ours = quantize_dequantize(
            t(x), expand_qparams(t(scales), x.shape, g), expand_qparams(t(zps, torch.int64), x.shape, g), qmin, qmax
        ).numpy()
        ref = ort_qdq(x, scales, zps, qtype, opset, axis=axis)
        assert bits_equal(ours, ref)

    check()


@pytest.mark.parametrize("qtype", list(ONNX_QTYPES))
def test_onnxruntime_blocked_equals_per_group(qtype):
    """ONNX opset-21 blocked QuantizeLinear (block_size along axis) is PerGroup(size, axis), ragged tail too."""
    _, _, signed, bits = ONNX_QTYPES[qtype]
    qmin, qmax = qrange(bits, signed)
    rng = np.random.default_rng(bits * 2 + signed)
    for shape, axis, size in [((4, 10), 1, 4), ((4, 10), -1, 3), ((9, 3), 0, 4), ((2, 7, 5), 1, 2), ((3, 8), 1, 8),
                              ((5, 6), 1, 1), ((2, 3, 13), 2, 5)]:
        g = PerGroup(size, axis)
        gshape = list(shape)
        gshape[axis] = -(-shape[axis] // size)
        scales = rng.uniform(1e-3, 2.0, gshape).astype(F32)
        zps = rng.integers(qmin, qmax + 1, gshape)
        x = (rng.standard_normal(shape) * (qmax - qmin) * 0.3 * float(scales.mean())).astype(F32)
        ours = quantize_dequantize(
            t(x), expand_qparams(t(scales), shape, g), expand_qparams(t(zps, torch.int64), shape, g), qmin, qmax
        ).numpy()
        ref = ort_qdq(x, scales, zps, qtype, 21, axis=axis % len(shape), block=size)
        assert bits_equal(ours, ref)


# ------------------------------------------------------------------------------ torch fake_quantize references


@HYP_FAST
@given(case=qcases(pow2=True))
def test_torch_fake_quantize_per_tensor_pow2_exact(case):
    x, s, z, qmin, qmax = t(case["x"]), case["scale"], case["zp"], case["qmin"], case["qmax"]
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    assert torch.equal(fake_quantize(x, torch.tensor(s), torch.tensor(z), qmin, qmax), ref)
    assert torch.equal(quantize_dequantize(x, torch.tensor(s), torch.tensor(z), qmin, qmax), ref)
    # tensor-qparams overload
    ref2 = torch.fake_quantize_per_tensor_affine(x, torch.tensor(s), torch.tensor(z, dtype=torch.int32), qmin, qmax)
    assert torch.equal(ref2, ref)


@HYP
@given(data=st.data())
def test_torch_fake_quantize_per_channel_pow2_exact(data):
    ndim = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(0, ndim - 1))
    _, qmin, qmax = data.draw(qranges())
    c = shape[axis]
    scales = torch.tensor(data.draw(st.lists(pow2_scales(), min_size=c, max_size=c)))
    zps = torch.tensor(data.draw(st.lists(st.integers(qmin, qmax), min_size=c, max_size=c)), dtype=torch.int32)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    view = [1] * ndim
    view[axis] = c
    span = (qmax - qmin + 6) * scales.reshape(view)
    x = (torch.rand(shape, generator=g) - 0.5) * span
    k = torch.randint(qmin - 2, qmax + 2, shape, generator=g) - zps.reshape(view)
    x = torch.where(torch.rand(shape, generator=g) < 0.3, (k + 0.5) * scales.reshape(view), x)
    ref = torch.fake_quantize_per_channel_affine(x, scales, zps, axis, qmin, qmax)
    gran = PerChannel(axis)
    s_e, z_e = expand_qparams(scales, shape, gran), expand_qparams(zps.long(), shape, gran)
    assert torch.equal(fake_quantize(x, s_e, z_e, qmin, qmax), ref)
    assert torch.equal(quantize_dequantize(x, s_e, z_e, qmin, qmax), ref)


def _check_reciprocal_mismatches(x, s, z, qmin, qmax):
    """torch computes round(x * (1/s)); ONNX and lowbit compute round(x / s).

    fl(1/s) carries a relative error <= 2^-24 and the product another <= 2^-24, so x * fl(1/s) is within about
    2^-23 |x/s| of the true x/s, and fl(x/s) within 2^-24 |x/s|. Two roundings of values that close can only
    pick different integers when the true x/s lies within ~2^-23 |x/s| of a half-integer, and then they
    differ by exactly one code. So every mismatch must be one step apart and sit on a (near-)tie.
    Returns the number of mismatching elements.
    """
    xt = t(x)
    ours = quantize(xt, torch.tensor(s), torch.tensor(z), qmin, qmax)
    ref_y = torch.fake_quantize_per_tensor_affine(xt, s, z, qmin, qmax)
    # recover torch's codes: (q - z) * s divided by s is exact to far better than half a code
    ref_q = torch.clamp(torch.round(ref_y / s) + z, qmin, qmax).to(torch.int64)
    assert torch.equal(dequantize(ref_q, torch.tensor(s), torch.tensor(z)), ref_y)
    diff = (ours - ref_q).abs()
    assert int(diff.max()) <= 1
    bad = diff.nonzero().flatten().numpy()
    r = np.asarray(x, np.float64)[bad] / np.float64(F32(s))  # x / s to ~1e-16 relative
    dist_to_tie = np.abs(r - (np.floor(r) + 0.5))
    assert np.all(dist_to_tie <= 2.0**-21 * np.abs(r) + 1e-12), (r, dist_to_tie)
    # where they agree on the code they agree on the float, bit for bit
    ours_y = quantize_dequantize(xt, torch.tensor(s), torch.tensor(z), qmin, qmax)
    same = diff == 0
    assert torch.equal(ours_y[same], ref_y[same])
    return len(bad)


@HYP_FAST
@given(case=qcases(pow2=False))
def test_torch_fake_quantize_per_tensor_arbitrary_scale(case):
    _check_reciprocal_mismatches(case["x"], case["scale"], case["zp"], case["qmin"], case["qmax"])


def test_torch_reciprocal_mismatch_only_near_ties_dense():
    """Dense sweep of near-ties (k + .5) * s +- a few ulps for arbitrary scales; also pins lowbit to division."""
    qmin, qmax = qrange(16, True)
    total = 0
    for s in [0.1, 0.3, 0.0123, 1 / 3, 2.7182817, 1e-3, 7.77]:
        s32 = F32(s)
        k = np.arange(-3000, 3000).astype(F32)
        base = (k + F32(0.5)) * s32
        x = np.concatenate([np.nextafter(base, np.inf), base, np.nextafter(base, -np.inf)]).astype(F32)
        total += _check_reciprocal_mismatches(x, float(s32), 0, qmin, qmax)
        np.testing.assert_array_equal(
            quantize(t(x), t(s32), torch.tensor(0), qmin, qmax).numpy(), np_quantize(x, s32, 0, qmin, qmax)
        )
        # ONNX Runtime divides as well: bit-exact on exactly these hard inputs
        assert bits_equal(qdq(x, s32, 0, qmin, qmax), ort_qdq(x[None, :], s32, 0, "int16")[0])
    # The sweep does hit the reciprocal-vs-division disagreement (thousands of near-ties here), so the
    # one-step / near-tie bound above is exercised, not vacuous. Should torch ever divide, this becomes 0.
    assert total > 0


# ----------------------------------------------------------------------------------------------- properties


@HYP_FAST
@given(case=qcases(inside_only=True))
def test_error_at_most_half_step_inside_range(case):
    x, s, z, qmin, qmax = case["x"], case["scale"], case["zp"], case["qmin"], case["qmax"]
    xh = qdq(x, s, z, qmin, qmax)
    x64, xh64 = x.astype(np.float64), xh.astype(np.float64)
    slack = 2.0**-22 * (np.abs(x64) + np.abs(xh64))  # one rounding in x / s and one in (q - z) * s
    assert np.all(np.abs(x64 - xh64) <= s / 2 + slack)


@HYP_FAST
@given(case=qcases())
def test_fake_quantize_is_idempotent(case):
    x, s, z, qmin, qmax = t(case["x"]), torch.tensor(case["scale"]), torch.tensor(case["zp"]), case["qmin"], case["qmax"]
    y = fake_quantize(x, s, z, qmin, qmax)
    assert torch.equal(fake_quantize(y, s, z, qmin, qmax), y)
    q = quantize(x, s, z, qmin, qmax)
    assert torch.equal(quantize(y, s, z, qmin, qmax), q)  # x̂ sits exactly on the grid of its own code
    yy = quantize_dequantize(y, s, z, qmin, qmax)
    assert torch.equal(yy, y)


@HYP_FAST
@given(case=qcases())
def test_quantize_is_monotone_and_bounded(case):
    x, s, z, qmin, qmax = case["x"], case["scale"], case["zp"], case["qmin"], case["qmax"]
    order = np.argsort(x, kind="stable")
    q = quantize(t(x[order]), torch.tensor(s), torch.tensor(z), qmin, qmax)
    assert torch.all(q[1:] >= q[:-1])
    y = qdq(x, s, z, qmin, qmax)
    lo = F32(qmin - z) * F32(s)
    hi = F32(qmax - z) * F32(s)
    assert np.all(y >= lo) and np.all(y <= hi)


def test_quantize_broadcasts_and_keeps_shape():
    x = torch.randn(2, 3, 4)
    s = torch.tensor([0.1, 0.2, 0.3]).reshape(1, 3, 1)
    z = torch.tensor([0, 5, -5]).reshape(1, 3, 1)
    q = quantize(x, s, z, -128, 127)
    assert q.shape == x.shape and q.dtype == torch.int64
    for c in range(3):
        assert torch.equal(q[:, c], quantize(x[:, c], s[0, c, 0], z[0, c, 0], -128, 127))


# ------------------------------------------------------------------------------ expand_qparams / group_view


def test_expand_qparams_per_tensor_and_channel():
    shape = (2, 3, 4)
    s = torch.tensor([0.5])
    assert expand_qparams(s, shape, PerTensor()).shape == ()
    assert expand_qparams(torch.tensor(0.25), shape, PerTensor()).item() == 0.25
    c = torch.arange(3.0)
    e = expand_qparams(c, shape, PerChannel(1))
    assert e.shape == (1, 3, 1) and torch.equal(e.flatten(), c)
    e = expand_qparams(torch.arange(4.0), shape, PerChannel(-1))
    assert e.shape == (1, 1, 4)
    assert expand_qparams(torch.arange(2.0), shape, PerChannel(0)).shape == (2, 1, 1)
    with pytest.raises(TypeError):
        expand_qparams(c, shape, "per_channel")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        expand_qparams(c, shape, None)  # type: ignore[arg-type]


def test_reduce_dims():
    assert reduce_dims(3, PerTensor()) == (0, 1, 2)
    assert reduce_dims(3, PerChannel(0)) == (1, 2)
    assert reduce_dims(3, PerChannel(-1)) == (0, 1)
    assert reduce_dims(2, PerGroup(16, 1)) == (0,)
    assert reduce_dims(4, PerChannel(2)) == (0, 1, 3)


@st.composite
def group_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    size = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    _, qmin, qmax = draw(qranges())
    return shape, PerGroup(size, axis), seed, qmin, qmax, draw(st.booleans())


@HYP
@given(case=group_cases())
def test_expand_qparams_per_group_matches_loop(case):
    shape, g, seed, *_ = case
    ax = g.axis % len(shape)
    n_groups = -(-shape[ax] // g.size)
    pshape = list(shape)
    pshape[ax] = n_groups
    p = torch.randn(pshape, generator=torch.Generator().manual_seed(seed))
    e = expand_qparams(p, shape, g)
    assert tuple(e.shape) == shape
    for i in range(shape[ax]):
        assert torch.equal(e.select(ax, i), p.select(ax, i // g.size))


@HYP
@given(case=group_cases())
def test_group_view_matches_loop(case):
    shape, g, seed, *_ = case
    ax = g.axis % len(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    v = group_view(x, g)
    n = shape[ax]
    n_groups = -(-n // g.size)
    assert tuple(v.shape) == shape[:ax] + (n_groups, g.size) + shape[ax + 1 :]
    for gi in range(n_groups):
        for j in range(g.size):
            i = gi * g.size + j
            got = v.select(ax, gi).select(ax, j)
            if i < n:
                assert torch.equal(got, x.select(ax, i))
            else:
                assert torch.equal(got, torch.zeros_like(got))  # ragged tail zero-padded


@HYP
@given(case=group_cases())
def test_per_group_fake_quantize_matches_naive_loop(case):
    shape, g, seed, qmin, qmax, symmetric = case
    ax = g.axis % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    v = group_view(x, g)
    lo, hi = v.amin(dim=ax + 1), v.amax(dim=ax + 1)  # one statistic per (other index, group)
    s, z = choose_qparams(lo, hi, qmin, qmax, symmetric)
    y = fake_quantize(x, expand_qparams(s, shape, g), expand_qparams(z, shape, g), qmin, qmax)
    yq = quantize_dequantize(x, expand_qparams(s, shape, g), expand_qparams(z, shape, g), qmin, qmax)
    assert torch.equal(y, yq)
    n = shape[ax]
    expected = torch.empty_like(x)
    for gi, start in enumerate(range(0, n, g.size)):
        stop = min(start + g.size, n)  # ragged last group
        xs = x.narrow(ax, start, stop - start)
        # naive: this group's own min/max over its elements, per index of the other dims
        other = tuple(d for d in range(len(shape)) if d != ax)
        xs_moved = xs.permute(*other, ax).reshape(*[shape[d] for d in other], stop - start)
        lo_i, hi_i = xs_moved.amin(-1), xs_moved.amax(-1)
        s_i, z_i = choose_qparams(lo_i, hi_i, qmin, qmax, symmetric)
        assert torch.equal(s_i, s.select(ax, gi)) and torch.equal(z_i, z.select(ax, gi))
        for idx in np.ndindex(*[shape[d] for d in other]):
            seg = xs_moved[idx]
            out = quantize_dequantize(seg, s_i[idx], z_i[idx], qmin, qmax)
            full_idx = list(idx)
            full_idx.insert(ax, slice(start, stop))
            expected[tuple(full_idx)] = out
    assert torch.equal(y, expected)
