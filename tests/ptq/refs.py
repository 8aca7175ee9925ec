"""Naive references for the post-training passes (written from the papers, one column / one weight at a time)."""

from __future__ import annotations

import torch


def rtn(w, s, z, qmin, qmax):
    return (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s


def naive_obq(w: torch.Tensor, h: torch.Tensor, s, z, qmin, qmax, order) -> torch.Tensor:
    """Optimal Brain Quantization in a fixed column order with an explicit inverse-Hessian downdate.

    For one matrix ``w [r, d]`` and ``h [d, d]`` (already damped): quantize column ``j``, spread the error
    ``(w_j − q_j) / [H⁻¹]_jj · [H⁻¹]_{j,:}`` over the remaining columns, then remove ``j`` from ``H⁻¹`` by
    Gaussian elimination. This is the algorithm GPTQ reorganises (Cholesky, lazy blocks).
    """
    w = w.double().clone()
    hinv = torch.linalg.inv(h.double())
    q = torch.zeros_like(w)
    remaining = list(order)
    for j in order:
        q[:, j] = rtn(w[:, j], s[:, j], z[:, j], qmin, qmax)
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        remaining.remove(j)
        for k in remaining:
            w[:, k] -= err * hinv[j, k]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q
