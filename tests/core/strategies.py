"""Hypothesis strategies shared by the core tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.core import qrange

F32 = np.float32


@st.composite
def qranges(draw, bits=None, signed=None, narrow=None):
    """(bits, qmin, qmax) for any width 2..16, signed / unsigned, narrow or not."""
    b = draw(st.integers(2, 16)) if bits is None else draw(st.sampled_from(bits))
    sg = draw(st.booleans()) if signed is None else signed
    narrow = draw(st.booleans()) if narrow is None else narrow
    qmin, qmax = qrange(b, sg, narrow)
    return b, qmin, qmax


def pow2_scales():
    return st.integers(-14, 6).map(lambda e: float(F32(2.0**e)))


def any_scales():
    """Arbitrary float32 scales (mostly not powers of two), spanning several decades."""
    return st.floats(1e-4, 50.0).map(lambda s: float(F32(s)))


@st.composite
def qcases(draw, pow2: bool = False, bits=None, signed=None, narrow=None, n_max: int = 48, inside_only: bool = False):
    """A scale, an in-range zero point and a float32 vector that stresses rounding and saturation.

    The vector mixes uniform values over (slightly beyond) the representable range, exact float32 products
    (k + 0.5) * s that sit on (or within one rounding of) a .5 tie, exact grid points k * s, and far
    out-of-range values that must saturate.
    """
    b, qmin, qmax = draw(qranges(bits, signed, narrow))
    s = draw(pow2_scales() if pow2 else st.one_of(any_scales(), pow2_scales()))
    z = draw(st.integers(qmin, qmax))
    lo_k, hi_k = qmin - z, qmax - z  # representable x / s
    pad = 0 if inside_only else 3
    n = draw(st.integers(1, n_max))
    kinds = draw(st.lists(st.sampled_from(["uniform", "tie", "grid", "far"] if not inside_only else
                                          ["uniform", "tie", "grid"]), min_size=n, max_size=n))
    vals = []
    for kind in kinds:
        if kind == "uniform":
            u = draw(st.floats(lo_k - pad, hi_k + pad))
            vals.append(F32(u) * F32(s))
        elif kind == "tie":
            k = draw(st.integers(lo_k - pad, hi_k + pad - 1)) if not inside_only else draw(st.integers(lo_k, max(lo_k, hi_k - 1)))
            vals.append(F32(k + 0.5) * F32(s))
        elif kind == "grid":
            k = draw(st.integers(lo_k - pad, hi_k + pad))
            vals.append(F32(k) * F32(s))
        else:
            vals.append(F32(draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(1.5, 1e3))) * F32(s) * F32(hi_k - lo_k + 1))
    x = np.asarray(vals, dtype=F32)
    if inside_only:
        x = np.clip(x, F32(lo_k) * F32(s), F32(hi_k) * F32(s))
    return {"bits": b, "qmin": qmin, "qmax": qmax, "scale": s, "zp": z, "x": x}
