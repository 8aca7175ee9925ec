"""GPTQ: quantize weights one column at a time, pushing each column's rounding error onto the columns not
yet quantized, so that the layer output error ``‖(W − Ŵ) X‖²`` stays small (Frantar et al., 2022).

For one group (``W``: ``[r, d]``, ``H = X Xᵀ + λ·mean(diag H)·I``), with ``U`` the upper Cholesky factor
of ``H⁻¹``, column ``j`` in turn::

    q_j  = Q(w_j)                                  (the layer's own scale / zero-point for that column)
    e_j  = (w_j − q_j) / U_jj
    w_k ← w_k − e_j · U_jk        for every k > j

which is the optimal least-squares update of the remaining columns (the seed's ``min ‖(W+Δ)X − ŴX‖``).
Columns may be visited in order of decreasing ``H_jj`` (``act_order``). Conv weights are handled as
im2col matrices, one per group (see ``lowbit.ptq.capture``); per-channel and per-group scales both work
because every element carries its own (frozen) scale and zero-point.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowbit.ptq.capture import ForwardLoop
from lowbit.ptq.weight_range import output_error, quantize_columns, round_layers

log = logging.getLogger(__name__)


def _damped(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H`` with dead inputs given unit curvature and ``damp · mean(diag)`` added; also the dead mask."""
    h = h.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(dim=-1, keepdim=True)
    diag += damp * mean
    return h, dead


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` (retrying with 10x more damping if ``H`` is not positive definite)."""
    for attempt in range(6):
        extra = damp * 10**attempt if damp > 0 else (0.0 if attempt == 0 else 1e-5 * 10**attempt)
        hd, _ = _damped(h, extra)
        lower, info = torch.linalg.cholesky_ex(hd)
        if not bool((info != 0).any()):
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if not bool((info != 0).any()):
                return upper
    raise RuntimeError("GPTQ: the input second moment is not positive definite even with heavy damping")


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                         qmin: int, qmax: int, damp: float = 0.01, block_size: int = 128,
                         act_order: bool = True) -> torch.Tensor:
    """GPTQ for a batch of groups.

    Args:
        weight: ``[G, r, d]`` float weights (one matrix per conv group; ``G = 1`` for Linear).
        hessian: ``[G, d, d]`` input second moment ``Σ x xᵀ`` (any positive scale).
        scale, zero_point: ``[G, r, d]`` per-element grid of the layer's weight quantizer.
        qmin, qmax: integer code range.
        damp: ``λ`` as a fraction of the mean diagonal.
        block_size: columns updated lazily together (the result does not depend on it).
        act_order: visit columns by decreasing ``H_jj``.

    Returns:
        ``[G, r, d]`` quantized weights, on the grid (``round(Ŵ / s) + z`` are exact integer codes).
    """
    w = weight.detach().double().clone()
    s, z = scale.double(), zero_point.double()
    h = hessian.double()
    _, dead = _damped(h, damp)
    w[dead.unsqueeze(1).expand_as(w)] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True)
        w, s, z = (_take_cols(t, perm) for t in (w, s, z))
        h = torch.gather(torch.gather(h, 1, perm.unsqueeze(-1).expand_as(h)), 2, perm.unsqueeze(1).expand_as(h))
    u = _inverse_cholesky(h, damp)
    q = torch.zeros_like(w)
    d = w.shape[-1]
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        err = torch.zeros_like(w[..., i1:i2])
        for j in range(i1, i2):
            col = w[..., j]
            qc = quantize_columns(col, s[..., j], z[..., j], qmin, qmax)
            q[..., j] = qc
            e = (col - qc) / u[:, j, j].unsqueeze(-1)
            w[..., j:i2] -= e.unsqueeze(-1) * u[:, j, j:i2].unsqueeze(1)
            err[..., j - i1] = e
        if i2 < d:
            w[..., i2:] -= torch.bmm(err, u[:, i1:i2, i2:])
    if perm is not None:
        q = _take_cols(q, torch.argsort(perm, dim=-1))
    return q.to(weight.dtype)


def _take_cols(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, 2, perm.unsqueeze(1).expand_as(t))


def apply(model: nn.Module, forward_loop, damp: float = 0.01, block_size: int = 128, act_order: bool = True,
          clip_search: bool = True) -> nn.Module:
    """GPTQ on every quantized Conv/Linear of a converted model, in execution order (see
    ``weight_range.round_layers`` for the per-layer steps: capture, ridge, clipping, rounding)."""
    def rounder(w, h, s, z, qmin, qmax):
        return gptq_quantize_weight(w, h, s, z, qmin, qmax, 0.0, block_size, act_order)

    return round_layers(model, forward_loop, rounder, "gptq", damp, clip_search)


__all__ = ["ForwardLoop", "apply", "gptq_quantize_weight", "output_error", "quantize_columns"]
