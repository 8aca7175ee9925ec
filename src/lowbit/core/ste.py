"""Fake quantization with straight-through gradients.

Forward (``z`` rounded and clamped to an integer code):

    x̂ = (clamp(round(x / s) + z, qmin, qmax) - z) * s

Backward, with ``v = round(x / s) + z`` and the "inside" mask ``qmin <= v <= qmax``:

    ∂x̂/∂x = 1 inside, 0 outside                                   (clipped straight-through estimator)
    ∂x̂/∂s = round(x/s) - x/s inside; qmin - z below; qmax - z above (LSQ, Esser et al. 2020)
    ∂x̂/∂z = 0 inside; -s outside                                   (LSQ+, Bhalgat et al. 2020)

The scale and zero-point gradients are multiplied by ``grad_factor`` (LSQ suggests
``1 / sqrt(numel * qmax)``) and summed over the dimensions the parameters were broadcast along.
"""

from __future__ import annotations

import torch

from lowbit.core.affine import quantize_dequantize


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` over broadcast dimensions so it has ``shape`` (the inverse of broadcasting)."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    grad = grad.sum(dim=tuple(range(lead))) if lead > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad.reshape(shape)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):  # noqa: D102
        z = torch.clamp(torch.round(zero_point), qmin, qmax)
        v = torch.round(x / scale) + z
        ctx.save_for_backward(x, scale, z, v)
        ctx.qrange = (qmin, qmax)
        ctx.grad_factor = grad_factor
        ctx.shapes = (scale.shape, zero_point.shape)
        return (torch.clamp(v, qmin, qmax) - z) * scale

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, scale, z, v = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = grad_out * inside
        grad_scale = grad_zp = None
        if ctx.needs_input_grad[1]:
            x_over_s = x / scale
            ds = torch.where(below, qmin - z, torch.where(above, qmax - z, torch.round(x_over_s) - x_over_s))
            grad_scale = _sum_to(grad_out * ds * ctx.grad_factor, ctx.shapes[0])
        if ctx.needs_input_grad[2]:
            dz = torch.where(inside, torch.zeros_like(x), -scale.expand_as(x))
            grad_zp = _sum_to(grad_out * dz * ctx.grad_factor, ctx.shapes[1])
        return grad_x, grad_scale, grad_zp, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with straight-through gradients for ``x`` and LSQ gradients for the qparams.

    Args:
        x: input tensor.
        scale: float tensor broadcastable to ``x`` (see ``expand_qparams``); may require grad.
        zero_point: tensor broadcastable to ``x``; rounded to an integer code in the forward pass; may require
            grad (kept as float for learning).
        qmin: smallest integer code.
        qmax: largest integer code.
        grad_factor: multiplier of the scale / zero-point gradients.

    Returns:
        ``x̂`` with ``x``'s shape, equal to ``quantize_dequantize`` in the forward pass.
    """
    scale = scale.to(x.dtype)
    zero_point = zero_point.to(x.dtype)
    if not (x.requires_grad or scale.requires_grad or zero_point.requires_grad):
        # Same integer code as the autograd path, so the forward does not depend on requires_grad.
        zero_point = torch.clamp(torch.round(zero_point), qmin, qmax)
        return quantize_dequantize(x, scale, zero_point, qmin, qmax)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor)
