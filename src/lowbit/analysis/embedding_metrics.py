"""Sentence-embedding metrics: how far quantized embeddings ``out`` are from the FP32 ones ``ref`` (``[N, D]``).

* mean cosine: ``mean_i ⟨ref_i, out_i⟩ / (‖ref_i‖ ‖out_i‖)`` (a zero row against a zero row counts 1)
* nearest-neighbour agreement: share of rows ``i`` whose nearest other row by cosine similarity,
  ``argmax_{j≠i} cos(e_i, e_j)``, is the same under ``out`` as under ``ref``
"""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), x)


def mean_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean row-wise cosine similarity (see module docstring)."""
    if ref.shape != out.shape or ref.ndim != 2:
        raise ValueError(f"mean_cosine: expected two [N, D] tensors of one shape, got {tuple(ref.shape)} and {tuple(out.shape)}")
    a, b = _unit(ref), _unit(out)
    cos = (a * b).sum(dim=1)
    both_zero = (a.abs().sum(dim=1) == 0) & (b.abs().sum(dim=1) == 0)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).mean().item())


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row (``[N]``, int64)."""
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"nearest_neighbours: need [N, D] with N >= 2, got {tuple(emb.shape)}")
    u = _unit(emb)
    sim = u @ u.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(dim=1)


def nn_agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Share of rows whose nearest neighbour among the other rows is the same for ``ref`` and ``out``."""
    if ref.shape != out.shape:
        raise ValueError(f"nn_agreement: shapes differ, {tuple(ref.shape)} and {tuple(out.shape)}")
    return float((nearest_neighbours(ref) == nearest_neighbours(out)).double().mean().item())


__all__ = ["mean_cosine", "nearest_neighbours", "nn_agreement"]
