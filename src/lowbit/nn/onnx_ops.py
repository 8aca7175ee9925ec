"""Autograd functions whose ONNX form is QuantizeLinear / DequantizeLinear.

In PyTorch they compute exactly what the fake quantizer computes; when traced by ``torch.onnx.export``
their ``symbolic`` emits the standard Q/DQ nodes, so ONNX Runtime and TensorRT see real integer tensors:

* ``QDQ``: float activation → ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``.
* ``DQ``: integer constant (int8 weight codes, int32 bias codes) → ``DequantizeLinear(q, s, z)``.

The zero-point's dtype decides the integer type in the graph (int8, uint8, int16, uint16, int32).
"""

from __future__ import annotations

import torch

_DTYPES = {
    (8, True): torch.int8,
    (8, False): torch.uint8,
    (16, True): torch.int16,
    (16, False): torch.uint16,
    (32, True): torch.int32,
}


def code_dtype(bits: int, signed: bool) -> torch.dtype:
    """Torch dtype that stores ``bits``-wide codes in the exported graph (4-bit codes travel as int8 here)."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    if bits <= 16:
        return _DTYPES[(16, signed)]
    return torch.int32


class QDQ(torch.autograd.Function):
    """``DequantizeLinear(QuantizeLinear(x))`` with per-tensor or per-axis parameters."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, qmin, qmax):  # noqa: D102
        shape = [1] * x.ndim
        if axis is not None:
            shape[axis] = -1
        s = scale.reshape(shape) if axis is not None else scale
        z = zero_point.to(torch.float32).reshape(shape) if axis is not None else zero_point.to(torch.float32)
        return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis, qmin, qmax):  # noqa: D102
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)


class DQ(torch.autograd.Function):
    """``DequantizeLinear(q)`` of an integer constant."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):  # noqa: D102
        shape = [1] * q.ndim
        if axis is not None:
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero_point = zero_point.reshape(shape)
        return (q.to(torch.float32) - zero_point.to(torch.float32)) * scale

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):  # noqa: D102
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", q, scale, zero_point, **kwargs)
