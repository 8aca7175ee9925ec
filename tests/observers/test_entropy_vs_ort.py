"""Our entropy calibration against ONNX Runtime's ``EntropyCalibrater`` on the same tensors.

How ORT does it (``onnxruntime.quantization.calibrate`` 1.32, ``HistogramCollector.collect_value``,
``merge_histogram`` and ``get_entropy_threshold``, which ``EntropyCalibrater`` runs per tensor):

* Histogram: ``np.histogram`` of the signed values over ``[−T, T]`` in ``num_bins`` bins, ``T = max|x|`` of
  the first batch, so ``w_ort = 2T / num_bins`` (``T / 1024`` for 2048 bins); a later batch beyond ``T``
  adds whole bins of the same width on both sides.
* Rule: candidate ``i`` keeps the signed window ``[n/2 − i, n/2 + i + 1)`` (``2i + 1`` bins, one more on the
  right), outliers go to the window's first / last bin, the window is merged into ``num_quantized_bins``
  chunks *over the whole window* (128 → 64 levels per side of zero), expanded back only over the full
  chunks (the remainder bins, which hold the right outliers, keep ``Q = 0`` and are smoothed to ``eps``),
  onto every position of a chunk (``Q`` is not zeroed where ``P = 0``), truncated to integers; KL in
  float32; threshold ``(edge[start], edge[stop])`` clipped to the observed ``[min, max]``.

Ours (TensorRT): the |x| histogram (fold of the signed one), ``i`` bins kept, ``n_q`` levels over
``[0, t]``, remainder to the last chunk, ``Q`` zero where ``P`` is, float64 (``test_entropy_rule``).

Bin width of the tolerance. The tensors are scaled so that ``max|x| = T = 4`` (a power of two) and the
observer uses ``bins=1024``: its grid is then ``w = 2^3 / 2048 = 4 / 1024 = w_ort`` with the same edges, so
both algorithms read bit-identical histograms (asserted by ``test_same_histogram_as_ort``, also after ORT
widens its range) and their candidate thresholds are edges of one common grid. "Within one bin" therefore
means ``|ours − ORT| ≤ w`` with that common ``w = 2^-8``. Level counts are matched too: ORT's
``num_quantized_bins=128`` (64 levels per side) is compared with our ``num_quantized_bins=64``, and ORT's
256 with our int8 default of 128.

Where the two must agree: when no clipping pays off (bounded data, spikes at the range ends) both keep
the full range, to within one bin — ``test_entropy_agrees_with_ort_on_bounded_data``.

Where they cannot: on unbounded tails (gaussian, laplace, relu'd, Student-t) the structural differences
above move the KL minimum by tens to hundreds of bins (ORT's empty remainder bins, for one, put
``Q' = eps`` under the window's last bin, which holds all the right outliers, and so penalise any threshold
that leaves outlier mass; MXNet spreads the last chunk over the remainder).
Measured on these tensors (our − ORT threshold, in bins of ``w = 2^-8``; ORT 128 vs our 64 levels | ORT 256
vs our 128): gaussian −34 | −16, laplace +122 | −22, relu −194 | −386, student-t(3) −18 | −22.
We do not loosen a tolerance to cover that; ``test_entropy_gap_with_ort_is_structural`` asserts instead
that ORT's threshold is reproduced bin-exactly by ``refs.ort_structure_entropy`` (our own loop of ORT's
structure on the same histogram) while ours equals the TensorRT loop within one bin: each side
implements its stated algorithm, and the gap is the difference between the algorithms.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lowbit.core import QuantSpec
from lowbit.observers import EntropyObserver, rules

from .refs import naive_entropy_kl, ort_histogram, ort_histogram_entropy, ort_structure_entropy

T = np.float32(4.0)
BINS = 1024
W = 4.0 / 1024
N = 200_000
LEVELS = [(128, 64), (256, 128)]  # (ORT num_quantized_bins over [-t, t], our n_q over [0, t])
logger = logging.getLogger(__name__)


def _sample(kind: str, seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    draw = {
        "uniform": lambda: rng.uniform(-1, 1, n),
        "tanh": lambda: np.tanh(2 * rng.standard_normal(n)),
        "sigmoid": lambda: 1 / (1 + np.exp(-rng.standard_normal(n))),
        "relu6": lambda: np.clip(3 * rng.standard_normal(n), 0, 6),
        "gaussian": lambda: rng.standard_normal(n),
        "laplace": lambda: rng.laplace(size=n),
        "relu": lambda: np.maximum(rng.standard_normal(n), 0),
        "student_t3": lambda: rng.standard_t(3, n),
    }[kind]
    return draw().astype(np.float32)


def _aligned(x: np.ndarray, amax: np.float32 = T) -> np.ndarray:
    """Scale to ``max|x| = amax`` exactly, attained on the negative side when the data has negatives."""
    x = (x / np.abs(x).max() * amax).astype(np.float32)
    if x.min() < 0 and x.max() == amax:
        x = -x
    return x


def _ours(batches, n_q: int) -> tuple[EntropyObserver, float, float]:
    obs = EntropyObserver(bins=BINS, num_quantized_bins=n_q)
    for batch in batches:
        obs.update(torch.from_numpy(batch))
    lo, hi = obs.compute_range(QuantSpec())
    return obs, float(lo), float(hi)


def _on_ort_grid(obs: EntropyObserver, n_ort: int, at_top: int) -> np.ndarray:
    """Our counts on ORT's ``n_ort`` bins (the middle ones of ours).

    ``np.histogram`` closes its last bin, so the ``at_top`` values equal to ``+T`` in ORT's first batch sit
    in ORT's bin ``[T − w, T]``, and stay there when ORT widens its range; ours are in ``[T, T + w)``.
    """
    counts = obs.counts.numpy().copy()
    half, top = counts.size // 2, counts.size // 2 + int(T / W)
    counts[top] -= at_top
    counts[top - 1] += at_top
    return counts[half - n_ort // 2 : half + n_ort // 2]


@pytest.mark.parametrize("kind", ["gaussian", "relu", "student_t3", "sigmoid"])
def test_same_histogram_as_ort(kind):
    first = _aligned(_sample(kind, 0, 50_000))
    grown = _aligned(_sample(kind, 1, 50_000), np.float32(6.0))  # ORT widens by whole bins, we rebin to 2^3
    for batches in ([first], [first, grown]):
        hist, edges = ort_histogram(batches)
        assert np.all(np.diff(edges) == W)
        obs, _, _ = _ours(batches, 128)
        assert obs.width == W
        np.testing.assert_array_equal(_on_ort_grid(obs, hist.size, int(np.sum(first == T))), hist)


@pytest.mark.parametrize("kind", ["uniform", "tanh", "relu6"])
@pytest.mark.parametrize(("ort_levels", "our_levels"), LEVELS)
def test_entropy_agrees_with_ort_on_bounded_data(kind, ort_levels, our_levels):
    x = _aligned(_sample(kind, 0))
    ort_lo, ort_hi, _, _ = ort_histogram_entropy([x], num_quantized_bins=ort_levels)
    _, lo, hi = _ours([x], our_levels)
    assert abs(lo - ort_lo) <= W and abs(hi - ort_hi) <= W, (lo, hi, ort_lo, ort_hi)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "relu", "student_t3"])
@pytest.mark.parametrize(("ort_levels", "our_levels"), LEVELS)
def test_entropy_gap_with_ort_is_structural(kind, ort_levels, our_levels, record_property):
    x = _aligned(_sample(kind, 0))
    ort_lo, ort_hi, hist, edges = ort_histogram_entropy([x], num_quantized_bins=ort_levels)
    model_lo, model_hi = ort_structure_entropy(hist, edges, float(x.min()), float(x.max()), ort_levels)
    assert (model_lo, model_hi) == (ort_lo, ort_hi)

    obs, lo, hi = _ours([x], our_levels)
    folded = rules.Histogram(obs.counts.numpy(), obs.width, obs.min_val, obs.max_val).folded().astype(np.float64)
    folded[0] = folded[1]  # entropy_range suppresses the zero spike first (pytorch-quantization's practice)
    cands, kl = naive_entropy_kl(folded, our_levels)
    t_ref = cands[int(np.argmin(kl))] * W
    assert abs(max(-hi, lo) - max(-t_ref, float(x.min()))) <= W
    assert abs(hi - min(t_ref, float(x.max()))) <= W

    gap = (hi - ort_hi) / W
    record_property("gap_bins", gap)
    logger.info("%s ORT %d levels: ORT hi %.4f, ours %.4f, gap %+.0f bins", kind, ort_levels, ort_hi, hi, gap)
