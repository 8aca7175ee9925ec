"""MSE-optimal quantization parameters: lsq_fit_qparams, grid_search_qparams, minmax_qparams.

Every MSE below is measured independently of lowbit: numpy's transcription of ONNX Q/DQ (``np_qdq``) and
a float64 mean of the squared error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.core import (PerChannel, PerGroup, PerTensor, choose_qparams, grid_search_qparams, lsq_fit_qparams,
                         minmax_qparams, qrange)

from .refs import np_qdq, np_quantize

F32 = np.float32
METHODS = {"lsq": lsq_fit_qparams, "grid": grid_search_qparams}


def gran(axis):
    """The granularity the fits take: per tensor for axis None, else per channel along ``axis``."""
    return PerTensor() if axis is None else PerChannel(axis)


def sample(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Draw from a named distribution with torch's generator only (no scipy / numpy RNG dependence)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("student_t2", "student_t3"):
        df = int(kind[-1])
        num = torch.randn(shape, generator=g, dtype=torch.float64)
        chi2 = (torch.randn((*shape, df), generator=g, dtype=torch.float64) ** 2).sum(-1)
        return (num / torch.sqrt(chi2 / df)).float()
    if kind == "laplace_outliers":  # Laplace(0, 1) with 0.5% of the values blown up 25x
        u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
        return torch.where(torch.rand(shape, generator=g) < 0.005, 25 * x, x).float()
    if kind == "gaussian":
        return torch.randn(shape, generator=g)
    raise ValueError(kind)


def ref_mse(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, axis):
    """Per-tensor scalar or per-channel vector (axis 0) of float64 mean squared error."""
    xn = x.numpy()
    s, z = scale.numpy(), zp.numpy()
    if axis is not None:
        view = [1] * xn.ndim
        view[axis] = -1
        s, z = s.reshape(view), z.reshape(view)
    err = (np_qdq(xn, s, z, qmin, qmax).astype(np.float64) - xn.astype(np.float64)) ** 2
    if axis is None:
        return np.float64(err.mean())
    return np.moveaxis(err, axis, 0).reshape(err.shape[axis], -1).mean(1)


def check_qparams(scale, zp, qmin, qmax, symmetric, shape):
    assert scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert tuple(scale.shape) == shape and tuple(zp.shape) == shape
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= qmin) & (zp <= qmax)).all()
    if symmetric:
        assert (zp == 0).all()


HEAVY = ["student_t3", "laplace_outliers"]
SHAPES = {None: (16384,), 0: (4, 8192)}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("axis", [None, 0], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", HEAVY)
def test_heavy_tails_beat_minmax(kind, bits, symmetric, axis, method):
    qmin, qmax = qrange(bits, True)
    x = sample(kind, SHAPES[axis], seed=bits + 2 * symmetric)
    s0, z0 = minmax_qparams(x, qmin, qmax, symmetric, gran(axis))
    s, z = METHODS[method](x, qmin, qmax, symmetric, gran(axis))
    shape = () if axis is None else (x.shape[0],)
    check_qparams(s, z, qmin, qmax, symmetric, shape)
    base, fit = ref_mse(x, s0, z0, qmin, qmax, axis), ref_mse(x, s, z, qmin, qmax, axis)
    if axis is None:
        assert fit < base
    else:
        assert np.all(fit <= base)  # never worse in any channel
        assert fit.mean() < base.mean()  # and strictly better overall
    # the win on heavy tails comes from a tighter grid than min-max (clipping the tail)
    assert float((s / s0).min()) < 1.0


@pytest.mark.parametrize("kind", ["student_t2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_student_t2_lsq_beats_minmax_per_channel(kind, bits, symmetric):
    qmin, qmax = qrange(bits, True)
    x = sample(kind, (8, 4096), seed=11)
    s0, z0 = minmax_qparams(x, qmin, qmax, symmetric, PerChannel(0))
    s, z = lsq_fit_qparams(x, qmin, qmax, symmetric, PerChannel(0))
    base, fit = ref_mse(x, s0, z0, qmin, qmax, 0), ref_mse(x, s, z, qmin, qmax, 0)
    assert np.all(fit <= base) and fit.mean() < base.mean()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_never_worse_than_minmax_on_gaussian(method, bits, signed, symmetric):
    qmin, qmax = qrange(bits, signed)
    for seed, (shape, axis) in enumerate([((2000,), None), ((6, 300), 0), ((5, 7, 40), 1), ((9, 33), -1)]):
        x = sample("gaussian", shape, seed) * 3 + (0.5 if not signed else 0.0)
        s0, z0 = minmax_qparams(x, qmin, qmax, symmetric, gran(axis))
        s, z = METHODS[method](x, qmin, qmax, symmetric, gran(axis))
        check_qparams(s, z, qmin, qmax, symmetric, () if axis is None else (shape[axis],))
        ax = None if axis is None else axis % x.ndim
        base = ref_mse(x, s0, z0, qmin, qmax, ax)
        fit = ref_mse(x, s, z, qmin, qmax, ax)
        # never worse (float32 vs float64 accumulation: allow a relative 1e-6 on exact ties of the search)
        assert np.all(fit <= base * (1 + 1e-6))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_single_step_solves_the_normal_equations(symmetric, axis, bits):
    """One iteration = least squares of R on the min-max codes Q: the returned scale is the regression slope
    (np.linalg.lstsq in float64) and the zero point the rounded intercept term, S* = cov(R,Q)/var(Q)."""
    qmin, qmax = qrange(bits, True)
    x = sample("student_t3", (16384,) if axis is None else (6, 4096), seed=5)
    s0, z0 = minmax_qparams(x, qmin, qmax, symmetric, gran(axis))
    s, z = lsq_fit_qparams(x, qmin, qmax, symmetric, gran(axis), iters=1)
    rows = [x.numpy().ravel()] if axis is None else list(x.numpy())
    s0v, z0v, sv, zv = (np.atleast_1d(t.numpy()) for t in (s0, z0, s, z))
    base = np.atleast_1d(ref_mse(x, s0, z0, qmin, qmax, axis))
    fit = np.atleast_1d(ref_mse(x, s, z, qmin, qmax, axis))
    accepted = 0
    for i, r in enumerate(rows):
        if sv[i] == s0v[i] and zv[i] == z0v[i]:
            # the one step did not help: then min-max is kept and the step's fit was not better
            assert fit[i] == base[i]
            continue
        accepted += 1
        q = np_quantize(r, s0v[i], z0v[i], qmin, qmax).astype(np.float64)
        r64 = r.astype(np.float64)
        if symmetric:
            slope = np.linalg.lstsq(q[:, None], r64, rcond=None)[0][0]
            assert slope == pytest.approx(np.dot(r64, q) / np.dot(q, q), rel=1e-12)
            assert sv[i] == pytest.approx(slope, rel=1e-5)
            assert zv[i] == 0
            # normal equation: residual orthogonal to the codes
            res = r64 - sv[i] * q
            assert abs(np.dot(res, q)) <= 1e-4 * np.linalg.norm(r64) * np.linalg.norm(q)
        else:
            (slope, icpt), *_ = np.linalg.lstsq(np.stack([q, np.ones_like(q)], 1), r64, rcond=None)
            cov = np.mean(r64 * q) - r64.mean() * q.mean()
            var = np.mean(q * q) - q.mean() ** 2
            assert slope == pytest.approx(cov / var, rel=1e-9)
            assert sv[i] == pytest.approx(slope, rel=1e-5)
            z_star = -icpt / slope  # R ≈ S (Q - Z)  =>  intercept = -S Z
            assert z_star == pytest.approx(q.mean() - r64.mean() / slope, rel=1e-9, abs=1e-9)
            assert abs(zv[i] - z_star) <= 0.5 + 1e-3  # rounded to the nearest code
            # normal equations of the continuous fit: residual orthogonal to Q and to 1
            res = r64 - slope * (q - z_star)
            assert abs(res.mean()) <= 1e-9 * np.abs(r64).max()
            assert abs(np.dot(res, q)) <= 1e-9 * np.linalg.norm(r64) * np.linalg.norm(q) * len(q) ** 0.5
        assert fit[i] < base[i]
    assert accepted >= max(1, len(rows) // 2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_more_iterations_never_hurt(symmetric):
    qmin, qmax = qrange(4, True)
    x = sample("laplace_outliers", (8192,), seed=3)
    prev = None
    for iters in [0, 1, 2, 5, 20]:
        s, z = lsq_fit_qparams(x, qmin, qmax, symmetric, iters=iters)
        m = ref_mse(x, s, z, qmin, qmax, None)
        if iters == 0:
            s0, z0 = minmax_qparams(x, qmin, qmax, symmetric)
            assert torch.equal(s, s0) and torch.equal(z, z0)
        else:
            assert m <= prev * (1 + 1e-6)
        prev = m
    assert prev < ref_mse(x, *minmax_qparams(x, qmin, qmax, symmetric), qmin, qmax, None)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_grid_search_picks_the_best_candidate(symmetric, axis):
    """The result is one of the candidates choose_qparams(α·min, α·max), α ∈ linspace(min_ratio, 1, n) and
    its (independently measured) MSE is the smallest over the grid, up to float32 accumulation."""
    qmin, qmax = qrange(4, True)
    x = sample("student_t3", (4096,) if axis is None else (3, 2048), seed=7)
    n, min_ratio = 25, 0.3
    s, z = grid_search_qparams(x, qmin, qmax, symmetric, gran(axis), num_candidates=n, min_ratio=min_ratio)
    dims = tuple(range(x.ndim)) if axis is None else tuple(range(1, x.ndim))
    lo, hi = x.amin(dim=dims), x.amax(dim=dims)
    cands = [choose_qparams(lo * a, hi * a, qmin, qmax, symmetric) for a in torch.linspace(min_ratio, 1.0, n).tolist()]
    mses = np.stack([np.atleast_1d(ref_mse(x, cs, cz, qmin, qmax, axis)) for cs, cz in cands])  # [n, C]
    sv, zv = np.atleast_1d(s.numpy()), np.atleast_1d(z.numpy())
    got = np.atleast_1d(ref_mse(x, s, z, qmin, qmax, axis))
    for c in range(mses.shape[1]):
        members = [k for k, (cs, cz) in enumerate(cands) if np.atleast_1d(cs.numpy())[c] == sv[c]
                   and np.atleast_1d(cz.numpy())[c] == zv[c]]
        assert members, "result is not on the candidate grid"
        assert got[c] <= mses[:, c].min() * (1 + 1e-5)
        assert got[c] < mses[-1, c]  # strictly better than α = 1 (min-max) on this heavy-tailed sample


def test_minmax_qparams_matches_choose_qparams():
    x = sample("gaussian", (5, 6, 7), seed=1)
    for axis in (None, 0, 1, 2, -1):
        for symmetric in (True, False):
            s, z = minmax_qparams(x, -8, 7, symmetric, gran(axis))
            if axis is None:
                lo, hi = x.min(), x.max()
            else:
                a = axis % x.ndim
                moved = x.movedim(a, 0).reshape(x.shape[a], -1)
                lo, hi = moved.min(1).values, moved.max(1).values
            s2, z2 = choose_qparams(lo, hi, -8, 7, symmetric)
            assert torch.equal(s, s2) and torch.equal(z, z2)


@pytest.mark.parametrize("fn", [minmax_qparams, lsq_fit_qparams, grid_search_qparams])
def test_one_dimensional_per_channel_is_per_element(fn):
    """A 1-D tensor quantized per channel along axis 0 has one channel per element (regression test:
    reducing over an empty dim tuple used to reduce over everything and return a single scalar)."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.0, 0.5])
    for symmetric in (True, False):
        s, z = fn(x, -128, 127, symmetric, PerChannel(0))
        assert s.shape == (5,) and z.shape == (5,)
        s2, z2 = choose_qparams(x, x, -128, 127, symmetric)
        if fn is minmax_qparams:
            assert torch.equal(s, s2) and torch.equal(z, z2)
        # each element is reproduced (up to float rounding) by its own scale: zero MSE per channel
        y = (torch.clamp(torch.round(x / s) + z, -128, 127) - z) * s
        torch.testing.assert_close(y, x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fn", [lsq_fit_qparams, grid_search_qparams, minmax_qparams])
@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_inputs_give_finite_params(fn, symmetric):
    x = torch.zeros(4, 16)
    x[1] = 3.0  # constant channel
    x[2, 5] = -1e-30  # almost zero
    x[3] = torch.linspace(-1, 1, 16)
    for axis in (None, 0):
        s, z = fn(x, -8, 7, symmetric, gran(axis))
        check_qparams(s, z, -8, 7, symmetric, () if axis is None else (4,))
        m = ref_mse(x, s, z, -8, 7, axis)
        assert np.all(np.isfinite(m))
    s, z = fn(x, -8, 7, symmetric, PerChannel(0))
    assert s[0].item() == 1.0  # all-zero channel keeps the unit scale and quantizes exactly
    assert ref_mse(x, s, z, -8, 7, 0)[0] == 0.0
    assert ref_mse(x, s, z, -8, 7, 0)[1] <= (3.0 / 7 / 2) ** 2


def test_inputs_are_not_modified_and_grad_is_ignored():
    x = sample("student_t3", (2, 512), seed=0).requires_grad_(True)
    before = x.detach().clone()
    for fn in METHODS.values():
        s, z = fn(x, -128, 127, False, PerChannel(0))
        assert not s.requires_grad
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("fn", [minmax_qparams, lsq_fit_qparams, grid_search_qparams])
def test_per_group_is_refused(fn):
    with pytest.raises(ValueError, match="per tensor or per channel"):
        fn(torch.randn(4, 64), -8, 7, True, PerGroup(32, axis=1))
