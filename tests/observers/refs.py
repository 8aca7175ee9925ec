"""Independent references for the observer tests.

* ``naive_entropy_kl``: TensorRT's entropy calibration written as the plain loop over thresholds of the
  MXNet/TVM ``_get_optimal_threshold`` family, on an |x| histogram (one candidate at a time, explicit P, Q,
  smoothing and KL), to check the vectorised ``rules.entropy_divergences``.
* ``abs_histogram`` / ``signed_histogram``: numpy binning with the observer's power-of-two grid.
* ``ort_histogram_entropy``: ONNX Runtime's ``HistogramCollector`` (the engine of ``EntropyCalibrater``)
  run directly on numpy tensors.
* ``seed_online_calibrator``: the seed's ``OnlineCalibrator`` (EMA of batch mean / variance) in numpy.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np

EPS = 1e-4


def smooth(p: np.ndarray, eps: float = EPS) -> np.ndarray | None:
    """MXNet/TensorRT smoothing: zeros get eps, non-zeros lose eps·n_zeros/n_nonzeros (None if all zero)."""
    zeros = p == 0
    n_nonzero = int((~zeros).sum())
    if n_nonzero == 0:
        return None
    return p + eps * zeros - eps * zeros.sum() / n_nonzero * (~zeros)


def naive_entropy_kl(abs_counts, n_q: int, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """(candidates i, KL) of TensorRT's algorithm, one threshold at a time."""
    h = np.asarray(abs_counts, dtype=np.float64)
    n_bins = int(np.flatnonzero(h)[-1]) + 1
    h = h[:n_bins]
    if n_bins <= n_q:
        return np.array([n_bins]), np.zeros(1)
    cands, kls = [], []
    for i in range(n_q, n_bins + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()  # outliers into the last kept bin
        nonzero = p != 0
        m = i // n_q
        starts = np.arange(n_q) * m  # last chunk takes the remainder
        lengths = np.diff(np.append(starts, i))
        mass = np.add.reduceat(h[:i], starts)
        norm = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(mass, norm, out=np.zeros_like(mass), where=norm > 0)
        q = np.repeat(per_bin, lengths)
        q[~nonzero] = 0.0
        ps, qs = smooth(p, eps), smooth(q, eps)
        if ps is None or qs is None:
            kl = np.inf
        else:
            pn, qn = ps / ps.sum(), qs / qs.sum()
            kl = float(np.sum(pn * np.log(pn / qn)))
        cands.append(i)
        kls.append(kl)
    return np.array(cands), np.array(kls)


def grid(x: np.ndarray, bins: int) -> tuple[int, float]:
    """The observer's grid for data ``x``: ``(L, w)`` with ``L = 2·bins``, ``w = 2^e / L``, ``2^(e−1) ≤ amax < 2^e``."""
    amax = float(np.max(np.abs(x)))
    exponent = math.frexp(amax)[1]
    return 2 * bins, math.ldexp(1.0, exponent) / (2 * bins)


def signed_histogram(x: np.ndarray, bins: int) -> np.ndarray:
    """Counts of ``floor(x / w) + L`` over ``2L`` bins, computed in float64."""
    half, width = grid(x, bins)
    idx = np.floor(np.asarray(x, np.float64) / width).astype(np.int64) + half
    return np.bincount(idx, minlength=2 * half)


def abs_histogram(x: np.ndarray, bins: int) -> tuple[np.ndarray, float]:
    """|x| histogram (fold of ``signed_histogram``) and its bin width."""
    half, width = grid(x, bins)
    counts = signed_histogram(x, bins)
    return counts[half:] + counts[:half][::-1], width


def _ort_collector(batches, num_bins: int, num_quantized_bins: int):
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(
        method="entropy", symmetric=True, num_bins=num_bins, num_quantized_bins=num_quantized_bins,
        percentile=99.99, scenario="same",
    )
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints progress
        for batch in batches:
            collector.collect({"t": [np.asarray(batch, np.float32)]})
    return collector


def ort_histogram(batches, num_bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's entropy histogram of ``batches``: ``(counts, bin edges)``."""
    hist, edges = _ort_collector(batches, num_bins, 128).get_histogram_dict()["t"][:2]
    return hist, edges


def ort_histogram_entropy(batches, num_bins: int = 2048, num_quantized_bins: int = 128):
    """ONNX Runtime's entropy calibration on ``batches``: ``(lo, hi, histogram counts, bin edges)``."""
    collector = _ort_collector(batches, num_bins, num_quantized_bins)
    with contextlib.redirect_stdout(io.StringIO()):
        lo, hi = collector.compute_collection_result()["t"][:2]
    hist, edges = collector.get_histogram_dict()["t"][:2]
    return float(lo), float(hi), hist, edges


def seed_online_calibrator(batches, beta: float, k: float) -> tuple[float, float]:
    """The seed's OnlineCalibrator: EMA of np.mean / np.var per batch, range mean ± k·std."""
    mean = var = 0.0
    for count, batch in enumerate(batches):
        batch_mean, batch_var = np.mean(batch, dtype=np.float64), np.var(batch, dtype=np.float64)
        if count == 0:
            mean, var = batch_mean, batch_var
        else:
            mean = beta * mean + (1 - beta) * batch_mean
            var = beta * var + (1 - beta) * batch_var
    std = math.sqrt(var)
    return mean - k * std, mean + k * std


def ort_structure_entropy(hist, edges, vmin: float, vmax: float, num_quantized_bins: int = 128):
    """Our own loop over ONNX Runtime's entropy *structure* (its algorithm as we read it, not its code).

    On the signed histogram of ``n`` bins with the zero bin at ``n // 2``, candidate ``i`` keeps the window
    ``[n/2 − i, n/2 + i + 1)`` (``2i + 1`` bins, one more on the right), left/right outliers go to the window's
    first/last bin; the raw window is merged into ``num_quantized_bins`` chunks of ``(2i + 1) // nqb`` bins
    (the remainder's mass joins the last chunk) but expanded back only over the ``nqb`` full chunks — the
    remainder positions keep ``Q = 0`` — onto *every* position of a chunk (also where ``P = 0``), truncated
    to an integer; then the same smoothing and KL, in float32. Returns ``(lo, hi)`` clipped to
    ``[vmin, vmax]``.
    """
    hist = np.asarray(hist, np.float64)
    n, n_q = hist.size, num_quantized_bins
    zero = n // 2
    best, best_kl = None, np.inf
    for i in range(n_q // 2, zero + 1):
        start, stop = zero - i, min(zero + i + 1, n)
        window = hist[start:stop]
        p = window.copy()
        p[0] += hist[:start].sum()
        p[-1] += hist[stop:].sum()
        m = window.size // n_q
        full = n_q * m
        mass = np.add.reduceat(window[:full], np.arange(n_q) * m)
        mass[-1] += window[full:].sum()
        norm = np.add.reduceat((p[:full] != 0).astype(np.float64), np.arange(n_q) * m)
        q = np.zeros(p.size)
        q[:full] = np.repeat(np.trunc(np.divide(mass, norm, out=np.zeros_like(mass), where=norm > 0)), m)
        ps, qs = smooth(p), smooth(q)
        if ps is None or qs is None:
            continue
        ps, qs = ps.astype(np.float32), qs.astype(np.float32)
        pn, qn = ps / ps.sum(), qs / qs.sum()
        kl = float(np.sum(np.where(pn > 0, pn * np.log(pn / qn), 0.0), dtype=np.float32))
        if kl < best_kl:
            best, best_kl = (float(edges[start]), float(edges[stop])), kl
    return max(best[0], vmin), min(best[1], vmax)
