"""Error metrics as pure functions of a reference ``ref`` (FP32) and a test tensor ``out`` (INT8).

* SQNR (dB, higher is better): ``10 · log10(Σ ref² / Σ (ref - out)²)``
* cosine similarity: ``⟨ref, out⟩ / (‖ref‖ ‖out‖)`` (flattened)
* MSE: ``mean((ref - out)²)``
* KL(P‖Q) of softmax outputs along the last dim, averaged over rows: ``Σ p (log p - log q)``
* top-1 agreement: share of rows whose argmax agrees
* histogram overlap: ``Σ min(h_ref, h_out) / Σ h_ref`` on shared bins
"""

from __future__ import annotations

import math

import torch


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` when identical."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    a, b = ref.double().flatten(), out.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a, b).item() / (na * nb))


def mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean squared error."""
    return float((ref.double() - out.double()).pow(2).mean().item())


def kl_softmax(ref_logits: torch.Tensor, out_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) ‖ softmax(out)) in nats."""
    logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logq = torch.log_softmax(out_logits.double(), dim=-1)
    return float((logp.exp() * (logp - logq)).sum(dim=-1).mean().item())


def top1_agreement(ref_logits: torch.Tensor, out_logits: torch.Tensor) -> float:
    """Share of rows whose argmax agrees."""
    return float((ref_logits.argmax(dim=-1) == out_logits.argmax(dim=-1)).double().mean().item())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose argmax equals the label."""
    return float((logits.argmax(dim=-1) == labels).double().mean().item())


def hist_overlap(ref_hist: torch.Tensor, out_hist: torch.Tensor) -> float:
    """``Σ min(h_ref, h_out) / Σ h_ref`` for two histograms on the same bins (1.0 = identical)."""
    total = ref_hist.double().sum().item()
    if total == 0:
        return 1.0
    return float(torch.minimum(ref_hist.double(), out_hist.double()).sum().item() / total)
