"""Integer arithmetic of the deployed engine (ONNX Runtime's CPU kernels), emulated bit for bit.

A float simulation of a quantized network rounds at the same places as the engine but not with the same
arithmetic: a value within float error of a .5 tie can land on the other code, and in deep networks such
one-code flips grow from layer to layer. Where the engine's formula is known we compute it exactly:

QLinearConv / QLinearMatMul (int32 accumulate, float32 requantize)::

    acc  = Σ (q_x - z_x) · q_w + q_b                       (exact integer; float64 holds it exactly)
    M    = fl32(fl32(s_x · s_w) / s_y)                     (per output channel)
    q_y  = clamp(rne(fl32(acc) · M), qmin - z_y, qmax - z_y) + z_y

QLinearAdd (AVX2 kernel: two fused multiply-adds in float32)::

    r_a = fl32(s_a / s_c),  r_b = fl32(s_b / s_c),  f = fl32(z_c - fl32(fl32(r_a z_a) + fl32(r_b z_b)))
    q_c = clamp(rne(fma(q_a, r_a, fma(q_b, r_b, f))), qmin, qmax)

``fma`` rounds once; computing it in float64 (exact for these magnitudes) and rounding to float32 is the same.
"""

from __future__ import annotations

import torch


FLOAT32_EXACT = 2**24  # every integer of magnitude below this is exact in float32


def codes_of(x_hat: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer offsets ``q - z`` of an already fake-quantized tensor ``x̂ = (q - z)·s`` (float32 values).

    ``x̂ / s`` is within a few ulps of an integer of magnitude < 2^16, so rounding recovers it exactly.
    """
    return torch.round(x_hat / scale.reshape(()))


def exact_dtype(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, reduce_dims: tuple[int, ...]) -> torch.dtype:
    """float32 when every partial sum of ``Σ a·w + b`` is an integer below 2^24 (so float32 is exact), else float64.

    Bound: ``max|a| · max_o Σ_k |w[o, k]| + max|b|``.
    """
    bound = a.abs().max() * w.abs().sum(dim=reduce_dims).max()
    if bias is not None:
        bound = bound + bias.abs().max()
    return torch.float32 if float(bound) < FLOAT32_EXACT else torch.float64


def requantize(acc: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor, s_y: torch.Tensor, z_y: int,
               qmin: int, qmax: int, channel_dim: int = 1) -> torch.Tensor:
    """Engine requantization of an exact int32 accumulator to output codes (float32 arithmetic)."""
    m = (s_x.float().reshape(()) * s_w.float().reshape(-1)) / s_y.float().reshape(())
    shape = [1] * acc.ndim
    shape[channel_dim] = -1
    y = acc.float() * (m.reshape(shape) if m.numel() > 1 else m.reshape(()))
    return torch.clamp(torch.round(y), qmin - z_y, qmax - z_y) + z_y


def qlinear_add(q_a: torch.Tensor, s_a, z_a: int, q_b: torch.Tensor, s_b, z_b: int, s_c, z_c: int,
                qmin: int, qmax: int) -> torch.Tensor:
    """Output codes of ONNX Runtime's AVX2 QLinearAdd for input codes ``q_a``, ``q_b`` (see module doc)."""
    f32 = torch.float32
    s_a, s_b, s_c = (torch.as_tensor(v, dtype=f32).reshape(()) for v in (s_a, s_b, s_c))
    r_a, r_b = s_a / s_c, s_b / s_c
    fixed = torch.tensor(float(z_c), dtype=f32, device=s_c.device) - (r_a * float(z_a) + r_b * float(z_b))
    c = (q_b.double() * r_b.double() + fixed.double()).float()
    c = (q_a.double() * r_a.double() + c.double()).float()
    return torch.clamp(torch.round(c), qmin, qmax)
