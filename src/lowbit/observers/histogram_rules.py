"""Pure decision rules on one histogram: percentile, entropy (TensorRT's KL algorithm) and MSE.

Every rule reads a :class:`Histogram` (the signed counts kept by ``HistogramObserver`` plus the exact
observed min and max) and returns a range ``(lo, hi)`` as Python floats; none keeps any state.

Layout of the signed histogram: ``2L`` bins of width ``w``; bin ``k`` covers ``[(k − L)·w, (k − L + 1)·w)``.
The |x| histogram is its fold, ``abs[k] = counts[L + k] + counts[L − 1 − k]`` (bin ``k`` covers
``[k·w, (k + 1)·w)``, up to the sign of the boundary points of negative bins).

Ranges. Entropy, and percentile with a symmetric spec, read the |x| histogram and return ``[−t, t]``
clipped to the observed ``[min, max]``: ``[min, t]`` with ``min ≥ 0`` for non-negative data, and a symmetric
range for data of both signs even when the spec is asymmetric (the entropy rule then spends half of an
affine code range on each side). Percentile with an asymmetric spec cuts each tail at its own percentile;
MSE scales ``[−amax, amax]`` (symmetric spec) or ``[min(min, 0), max(max, 0)]`` (asymmetric spec).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lowbit.core import choose_qparams, quantize_dequantize

DEFAULT_SMOOTHING_EPS = 1e-4


@dataclass(frozen=True)
class Histogram:
    """Signed histogram counts with the exact extrema of the data.

    Attributes:
        counts: int64 ``[2L]`` counts; bin ``k`` covers ``[(k − L)·w, (k − L + 1)·w)``.
        width: bin width ``w``.
        vmin: exact minimum of the data.
        vmax: exact maximum of the data.
    """

    counts: np.ndarray
    width: float
    vmin: float
    vmax: float

    @property
    def half(self) -> int:
        """``L``, the number of bins on each side of zero."""
        return self.counts.size // 2

    def folded(self) -> np.ndarray:
        """|x| histogram ``[L]``: ``abs[k] = counts[L + k] + counts[L − 1 − k]``."""
        half = self.half
        return self.counts[half:] + self.counts[:half][::-1]

    def clip(self, lo: float, hi: float) -> tuple[float, float]:
        """``(max(lo, vmin), min(hi, vmax))``."""
        return max(float(lo), self.vmin), min(float(hi), self.vmax)


# ---------------------------------------------------------------------------------------------- percentile
def histogram_quantile(counts: np.ndarray, first_edge: float, width: float, q: float) -> float:
    """The ``q``-quantile of the histogrammed data, with the mass of each bin spread evenly inside it.

    The rank convention is numpy's default (``linear``): the value at 0-based rank ``r = q·(N − 1)``. With
    cumulative counts ``C_k``, the ``j``-th element of bin ``k`` is placed at the centre of its share of the
    bin, so rank ``r`` sits at the count position ``T = r + 1/2``; bin ``k`` is the first with ``C_k ≥ T``,
    and

        value = first_edge + (k + (T − C_{k−1}) / h_k)·w        (linear interpolation inside bin k).

    The result lies in the bin of the element of rank ``round(r)``; when ``r`` is an integer numpy returns
    that element, so the two differ by less than one bin. ``q ≤ 0`` / ``q ≥ 1`` give the lower edge of the
    first / the upper edge of the last non-empty bin (clip them to the observed min / max).
    """
    cdf = np.cumsum(counts, dtype=np.float64)
    total = cdf[-1]
    if q <= 0.0:
        return first_edge + int(np.flatnonzero(counts)[0]) * width
    if q >= 1.0:
        return first_edge + (int(np.flatnonzero(counts)[-1]) + 1) * width
    target = q * (total - 1.0) + 0.5
    k = min(int(np.searchsorted(cdf, target, side="left")), counts.size - 1)
    before = cdf[k - 1] if k else 0.0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return first_edge + (k + min(max(frac, 0.0), 1.0)) * width


def percentile_range(hist: Histogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    """Percentile clipping.

    symmetric: ``t`` = the ``p``-th percentile of |x| (folded histogram), range ``[−t, t]``;
    asymmetric: ``lo`` = the ``(100 − p)``-th and ``hi`` = the ``p``-th percentile of x (signed histogram).
    Both are clipped to the observed ``[min, max]``.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile!r}")
    if symmetric:
        t = histogram_quantile(hist.folded(), 0.0, hist.width, percentile / 100.0)
        return hist.clip(-t, t)
    first = -hist.half * hist.width
    lo = histogram_quantile(hist.counts, first, hist.width, (100.0 - percentile) / 100.0)
    hi = histogram_quantile(hist.counts, first, hist.width, percentile / 100.0)
    return hist.clip(lo, hi)


# ---------------------------------------------------------------------------------------------- entropy
def quantized_bins(qmin: int, qmax: int, symmetric: bool, nonnegative: bool) -> int:
    """Number of quantization levels ``n_q`` that cover ``[0, t]`` in the entropy rule.

    Non-negative data: ``qmax + 1`` levels for a symmetric spec (128 for int8, 256 for uint8), all
    ``qmax − qmin + 1`` for an asymmetric one (the affine range ``[0, t]`` uses every code). Data of both
    signs: ``qmax + 1`` (symmetric) or ``(qmax − qmin + 1) // 2`` (asymmetric), i.e. ``2^(bits−1)``.
    """
    if symmetric:
        return qmax + 1
    return qmax - qmin + 1 if nonnegative else (qmax - qmin + 1) // 2


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.size + 1, dtype=np.float64)
    np.cumsum(values, out=out[1:])
    return out


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def entropy_divergences(
    abs_counts: np.ndarray, num_quantized_bins: int, eps: float = DEFAULT_SMOOTHING_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P‖Q) of TensorRT's entropy calibration for every candidate, without a loop over candidates.

    The |x| histogram ``h`` is trimmed to its last non-zero bin (``B`` bins, total ``N``). Candidate ``i``
    (``n_q ≤ i ≤ B`` bins kept) compares

    * P: ``h[:i]`` with the outlier mass ``Σ h[i:]`` added to ``P[i−1]`` (so ``P[i−1] = N − H_{i−1} > 0``);
    * Q: ``h[:i]`` cut into ``n_q`` chunks of ``m = i // n_q`` bins (the last takes the remainder); each
      chunk's mass ``M_j`` is spread evenly over its ``c_j`` positions where ``P ≠ 0`` (``q_j = M_j / c_j``);
      ``Q = 0`` where P is;
    * smoothing (MXNet/TensorRT, on counts): zeros become ``eps``, non-zeros lose ``e = eps·n_zero/n_nonzero``
      (``e_P`` for P, ``e_Q`` for Q), which keeps the totals ``ΣP' = N`` and ``ΣQ' = H_i = Σ h[:i]``.

    ``KL = Σ p log(p/q)`` with ``p = P'/N``, ``q = Q'/H_i``. Zero positions (``P' = Q' = eps``) add nothing:

        KL = (Σ_{P≠0} P' log P' − Σ_{P≠0} P' log Q') / N + log(H_i / N).

    Every term comes from prefix sums of ``h``, ``[h > 0]``, ``h log h``, ``log h`` and ``1/h``:

    * ``Σ_{k<i−1} f(h_k − e_P)``, ``f(x) = x log x``, to second order:
      ``f(h − e) = f(h) − e·(log h + 1) + e²/(2h) + O(e³/h²)``; ``P[i−1]`` is exact.
    * ``Σ P' log Q'`` per chunk is ``(Σ_chunk P − e_P·c_j)·log(q_j − e_Q)``. The first ``n_q − 1`` chunks
      depend on ``i`` only through ``m``, so with ``log(q − e) = log q − e/q − e²/(2q²) + O(e³/q³)`` and
      ``M_j/q_j = c_j`` their sum is ``A1 − e_P·A2 − e_Q·A3 + (e_P·e_Q − e_Q²/2)·A4`` with
      ``A1 = Σ M log q``, ``A2 = Σ c log q``, ``A3 = Σ c``, ``A4 = Σ c²/M`` computed once per ``m``
      (``B / n_q`` values). The last chunk is exact; if it holds no mass (``M = 0`` but ``P[i−1] > 0``),
      ``Q'[i−1] = eps`` and Q has one more zero.

    The cost is O(B) for all candidates together.

    Returns:
        ``(candidates, kl)``: the numbers of bins kept ``i`` and their divergences (``inf`` where
        ``H_i = 0``). A histogram with ``B ≤ n_q`` returns the single candidate ``B`` with ``kl = 0``.
    """
    h = np.asarray(abs_counts, dtype=np.float64)
    nonzero = np.flatnonzero(h)
    if nonzero.size == 0:
        raise ValueError("entropy rule needs a histogram with at least one count")
    n_bins, n_q = int(nonzero[-1]) + 1, int(num_quantized_bins)
    if n_q < 1:
        raise ValueError(f"num_quantized_bins must be >= 1, got {n_q}")
    if n_bins <= n_q:
        return np.array([n_bins]), np.zeros(1)
    return _all_divergences(h[:n_bins], n_q, eps)


def _all_divergences(h: np.ndarray, n_q: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Body of :func:`entropy_divergences` on a trimmed histogram (``h[-1] > 0``, ``h.size > n_q``)."""
    n_bins = h.size
    total, pos = h.sum(), h > 0
    log_h = np.log(np.where(pos, h, 1.0))
    cum_h, cum_nz, cum_f = _prefix(h), _prefix(pos), _prefix(h * log_h)
    cum_log, cum_inv = _prefix(log_h), _prefix(np.where(pos, 1.0 / np.where(pos, h, 1.0), 0.0))

    i = np.arange(n_q, n_bins + 1)
    m = i // n_q
    p_last = total - cum_h[i - 1]
    nnz_p = cum_nz[i - 1] + 1.0
    e_p = eps * (i - nnz_p) / nnz_p
    plogp = cum_f[i - 1] - e_p * (cum_log[i - 1] + cum_nz[i - 1]) + 0.5 * e_p**2 * cum_inv[i - 1]
    plogp += _xlogx(p_last - e_p)

    start_last = (n_q - 1) * m
    mass_last = cum_h[i] - cum_h[start_last]
    count_last = cum_nz[i] - cum_nz[start_last] + (h[i - 1] == 0)
    last_empty = mass_last == 0
    nnz_q = nnz_p - last_empty
    e_q = eps * (i - nnz_q) / np.maximum(nnz_q, 1.0)
    a1, a2, a3, a4 = _chunk_sums(cum_h, cum_nz, int(m[-1]), n_q)
    g = m - 1
    plogq = a1[g] - e_p * a2[g] - e_q * a3[g] + (e_p * e_q - 0.5 * e_q**2) * a4[g]
    q_last = np.where(last_empty, eps, mass_last / count_last - e_q)
    plogq += (total - cum_h[start_last] - e_p * count_last) * np.log(np.maximum(q_last, 1e-300))

    kept = cum_h[i]
    with np.errstate(divide="ignore"):
        kl = (plogp - plogq) / total + np.log(kept / total)
    kl[kept == 0] = np.inf
    return i, kl


def _chunk_sums(cum_h: np.ndarray, cum_nz: np.ndarray, max_m: int, n_q: int) -> tuple[np.ndarray, ...]:
    """For chunk size ``m = 1 .. max_m``: ``Σ M log q, Σ c log q, Σ c, Σ c²/M`` over chunks ``0 .. n_q − 2``."""
    size = np.arange(1, max_m + 1)[:, None]
    starts = size * np.arange(n_q - 1)[None, :]
    mass = cum_h[starts + size] - cum_h[starts]
    count = cum_nz[starts + size] - cum_nz[starts]
    valid = mass > 0
    safe_mass, safe_count = np.where(valid, mass, 1.0), np.where(valid, count, 1.0)
    log_q = np.where(valid, np.log(safe_mass / safe_count), 0.0)
    count = np.where(valid, count, 0.0)
    return (
        (mass * log_q).sum(axis=1),
        (count * log_q).sum(axis=1),
        count.sum(axis=1),
        (count**2 / safe_mass).sum(axis=1),
    )


def entropy_threshold(
    abs_counts: np.ndarray, width: float, num_quantized_bins: int, eps: float = DEFAULT_SMOOTHING_EPS
) -> float:
    """TensorRT's KL threshold ``t = i*·w``: the upper edge of the last kept bin for the ``i`` of least KL.

    KL is not monotonic in ``i``, so every candidate is evaluated (see :func:`entropy_divergences`); ties
    go to the smallest ``i``, as ``argmin`` in the reference implementations.
    """
    candidates, kl = entropy_divergences(abs_counts, num_quantized_bins, eps)
    return float(candidates[int(np.argmin(kl))]) * width


def entropy_range(
    hist: Histogram, num_quantized_bins: int, eps: float = DEFAULT_SMOOTHING_EPS
) -> tuple[float, float]:
    """``[−t, t]`` clipped to ``[min, max]`` for the entropy threshold ``t`` of the |x| histogram.

    Before the search the first bin (which holds the exact zeros) is set to the count of the second, as
    NVIDIA's pytorch-quantization does: after ReLU / ReLU6 half of all values can be exactly 0, and that
    spike, smeared over a merged chunk of Q, would make the smallest chunk (the smallest threshold) win —
    on EfficientNet-Lite0 it clipped ReLU6 outputs to [0, 1] and top-1 agreement fell to 0.
    """
    counts = hist.folded().astype(np.float64, copy=True)
    if counts.size > 1:
        counts[0] = counts[1]
    t = entropy_threshold(counts, hist.width, num_quantized_bins, eps)
    return hist.clip(-t, t)


# ---------------------------------------------------------------------------------------------- MSE
def mse_range(
    hist: Histogram,
    qmin: int,
    qmax: int,
    symmetric: bool,
    num_candidates: int = 256,
    min_ratio: float = 0.01,
) -> tuple[float, float]:
    """Clipping range of least expected squared quantization error.

    Candidates scale the full range by ``α ∈ linspace(min_ratio, 1, num_candidates)``: ``[−α·amax, α·amax]``
    for a symmetric spec, ``α·[min(vmin, 0), max(vmax, 0)]`` otherwise. For each, ``(s, z)`` comes from
    ``choose_qparams`` with the spec's ``qmin, qmax, symmetric``, and the error is taken at the bin centres
    ``c_k`` weighted by their counts ``h_k``:

        E(α) = Σ_k h_k · (c_k − (clamp(round(c_k / s) + z, qmin, qmax) − z)·s)²

    all candidates at once (a ``[num_candidates, non-empty bins]`` array). Ties go to the largest α.
    """
    if num_candidates < 1 or not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"need num_candidates >= 1 and min_ratio in (0, 1], got {num_candidates}, {min_ratio}")
    idx = np.flatnonzero(hist.counts)
    if idx.size == 0:
        raise ValueError("MSE rule needs a histogram with at least one count")
    centres = torch.from_numpy((idx - hist.half + 0.5) * hist.width).float()
    weights = torch.from_numpy(hist.counts[idx].astype(np.float64))
    alphas = torch.linspace(min_ratio, 1.0, num_candidates, dtype=torch.float64)
    if symmetric:
        amax = max(-hist.vmin, hist.vmax, 0.0)
        lo, hi = -alphas * amax, alphas * amax
    else:
        lo, hi = alphas * min(hist.vmin, 0.0), alphas * max(hist.vmax, 0.0)
    scale, zp = choose_qparams(lo.float(), hi.float(), qmin, qmax, symmetric)
    errors = torch.empty(num_candidates, dtype=torch.float64)
    step = max(1, (1 << 22) // idx.size)
    for s in range(0, num_candidates, step):
        sl = slice(s, s + step)
        xq = quantize_dequantize(centres[None, :], scale[sl, None], zp[sl, None], qmin, qmax)
        errors[sl] = (xq - centres[None, :]).double().pow(2) @ weights
    best = num_candidates - 1 - int(torch.argmin(errors.flip(0)))
    return hist.clip(float(lo[best]), float(hi[best])) if symmetric else (float(lo[best]), float(hi[best]))
