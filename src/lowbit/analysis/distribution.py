"""Distribution checks of a quantizer on FP32 values ``x`` and their fake-quantized ``x̂ = Q(x)``, streamed.

With the representable range ``[lo, hi] = [(qmin − z)·s, (qmax − z)·s]`` and ``e = x̂ − x``:

* ``clip_mse  = Σ_{x ∉ [lo, hi]} e² / n`` (error of values the quantizer clamps),
  ``round_mse = Σ_{x ∈ [lo, hi]} e² / n`` (rounding error inside the range); they add up to the MSE;
* ``clip_rate``: share of values outside ``[lo, hi]``;
* ``saturation_rate``: share of codes at ``qmin`` or ``qmax``, not counting values that sit exactly on
  that code's real value (the zeros after a ReLU are code 0 without being saturated);
* ``kl = Σ p · log(p / q)`` of the FP32 (p) and quantized (q) histograms, and
  ``hist_overlap = Σ min(h_fp32, h_q) / Σ h_fp32`` (flag below 0.8); both on ``BINS`` fixed bins over
  ``[lo − w/4, hi + w/4]`` (``w = hi − lo``), values beyond fall into the end bins;
* ``outlier_rate``: share of FP32 values beyond ``μ ± 4σ`` (μ, σ from running sums; counted on a fine
  ``FINE_BINS`` histogram over ``[lo − 2w, hi + 2w]``, so exact to one fine bin);
* an error histogram of ``x̂ − x`` on ``BINS`` bins over ``[−4·s, 4·s]`` (s: largest scale).

Per-channel weight quantizers use per-channel ranges; the histograms then use the widest channel range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.nn import TensorQuantizer

BINS = 64
FINE_BINS = 2048
KL_EPS = 1e-10


@dataclass
class QuantizerStats:
    """Running statistics of one quantizer over every tensor it was shown."""

    quantizer: TensorQuantizer
    n: int = 0
    clip_sq: float = 0.0
    round_sq: float = 0.0
    clipped: int = 0
    saturated: int = 0
    nonfinite: int = 0
    s1: float = 0.0
    s2: float = 0.0
    edges: torch.Tensor | None = None
    err_edges: torch.Tensor | None = None
    fine_edges: torch.Tensor | None = None
    h_fp32: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    h_quant: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    h_err: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    h_fine: torch.Tensor = field(default_factory=lambda: torch.zeros(FINE_BINS, dtype=torch.float64))

    def _ranges(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.quantizer
        s, z = q.expanded(shape)
        return (q.spec.qmin - z) * s, (q.spec.qmax - z) * s

    def _init_edges(self) -> None:
        q = self.quantizer
        s, z = q.scale.double(), q.zero_point.double()
        lo, hi = float(((q.spec.qmin - z) * s).min()), float(((q.spec.qmax - z) * s).max())
        w = max(hi - lo, 1e-12)
        self.edges = torch.linspace(lo - w / 4, hi + w / 4, BINS + 1, dtype=torch.float64)
        self.fine_edges = torch.linspace(lo - 2 * w, hi + 2 * w, FINE_BINS + 1, dtype=torch.float64)
        smax = float(s.max())
        self.err_edges = torch.linspace(-4 * smax, 4 * smax, BINS + 1, dtype=torch.float64)

    def update(self, x: torch.Tensor, xq: torch.Tensor) -> None:
        """Add one tensor ``x`` (FP32) and its fake-quantized ``xq`` (the histograms live on their device)."""
        if self.edges is None:
            self._init_edges()
        x, xq = x.detach(), xq.detach()
        if self.h_fp32.device != x.device:
            for key in ("h_fp32", "h_quant", "h_err", "h_fine"):
                setattr(self, key, getattr(self, key).to(x.device))
        finite = torch.isfinite(x) & torch.isfinite(xq)
        self.nonfinite += int((~finite).sum())
        lo, hi = self._ranges(x.shape)
        inside = (x >= lo) & (x <= hi)
        e2 = (xq.double() - x.double()).pow(2)
        self.clip_sq += float(e2[~inside & finite].sum())
        self.round_sq += float(e2[inside & finite].sum())
        self.clipped += int((~inside & finite).sum())
        codes = self.quantizer.quantize_codes(torch.nan_to_num(x))
        spec = self.quantizer.spec
        at_edge = ((codes == spec.qmin) & (x != lo)) | ((codes == spec.qmax) & (x != hi))
        self.saturated += int((at_edge & finite).sum())
        xf, qf = x[finite].double(), xq[finite].double()
        self.n += xf.numel()
        self.s1 += float(xf.sum())
        self.s2 += float(xf.pow(2).sum())
        self.h_fp32 += _hist(xf, self.edges)
        self.h_quant += _hist(qf, self.edges)
        self.h_err += _hist(qf - xf, self.err_edges)
        self.h_fine += _hist(xf, self.fine_edges)

    def summary(self) -> dict:
        """The figures in the module doc (None when nothing was seen)."""
        if self.n == 0:
            return {"kl": None, "hist_overlap": None, "clip_mse": None, "round_mse": None, "clip_rate": None,
                    "saturation_rate": None, "outlier_rate": None, "nonfinite": self.nonfinite}
        return {
            "kl": kl_divergence(self.h_fp32, self.h_quant),
            "hist_overlap": float(torch.minimum(self.h_fp32, self.h_quant).sum() / self.h_fp32.sum()),
            "clip_mse": self.clip_sq / self.n,
            "round_mse": self.round_sq / self.n,
            "clip_rate": self.clipped / self.n,
            "saturation_rate": self.saturated / self.n,
            "outlier_rate": self._outlier_rate(),
            "nonfinite": self.nonfinite,
        }

    def _outlier_rate(self) -> float:
        mu = self.s1 / self.n
        sigma = math.sqrt(max(self.s2 / self.n - mu * mu, 0.0))
        centers = (self.fine_edges[1:] + self.fine_edges[:-1]) / 2
        beyond = ((centers - mu).abs() > 4 * sigma).to(self.h_fine.device)
        return float(self.h_fine[beyond].sum() / self.n)

    def histograms(self) -> dict:
        """``{"edges", "fp32", "quant", "error", "error_edges"}`` as plain lists (counts)."""
        if self.edges is None:
            return {"edges": [], "fp32": [], "quant": [], "error": [], "error_edges": []}
        return {
            "edges": self.edges.tolist(), "fp32": self.h_fp32.tolist(), "quant": self.h_quant.tolist(),
            "error": self.h_err.tolist(), "error_edges": self.err_edges.tolist(),
        }


def _hist(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``x`` in the bins ``edges`` (values beyond the ends go to the end bins)."""
    n = edges.numel() - 1
    lo, hi = float(edges[0]), float(edges[-1])
    idx = ((x - lo) / (hi - lo) * n).floor().clamp(0, n - 1).long()
    return torch.bincount(idx.flatten(), minlength=n).double()


def kl_divergence(h_p: torch.Tensor, h_q: torch.Tensor) -> float:
    """``Σ p log(p / q)`` of two histograms normalised to 1, with ``KL_EPS`` added to both."""
    p = h_p.double() / max(float(h_p.sum()), 1.0) + KL_EPS
    q = h_q.double() / max(float(h_q.sum()), 1.0) + KL_EPS
    p, q = p / p.sum(), q / q.sum()
    return float((p * (p / q).log()).sum())


def weight_error_split(quantizer: TensorQuantizer, weight: torch.Tensor) -> dict:
    """Clipping vs rounding split of a weight quantizer (see module doc): ``weight_clip_mse`` etc."""
    stats = QuantizerStats(quantizer)
    with torch.no_grad():
        was = quantizer.enabled
        quantizer.enabled = True
        try:
            stats.update(weight, quantizer(weight))
        finally:
            quantizer.enabled = was
    s = stats.summary()
    return {"weight_clip_mse": s["clip_mse"], "weight_round_mse": s["round_mse"], "weight_clip_rate": s["clip_rate"]}


def asymmetry(quantizer: TensorQuantizer, stats: QuantizerStats) -> float | None:
    """Share of a symmetric signed grid the data never uses: ``1 − (max − min) / (hi − lo)`` (0 = balanced).

    A symmetric signed quantizer on all-positive data wastes half its codes (≈ 0.5).
    """
    spec = quantizer.spec
    if spec is None or not spec.symmetric or not spec.signed or stats.n == 0:
        return None
    used = stats.h_fine > 0
    if not used.any():
        return None
    idx = used.nonzero().flatten()
    span = float(stats.fine_edges[idx[-1] + 1] - stats.fine_edges[idx[0]])
    lo, hi = float(stats.edges[0]), float(stats.edges[-1])
    grid = (hi - lo) / 1.5
    return max(0.0, 1.0 - span / grid) if grid > 0 else None
