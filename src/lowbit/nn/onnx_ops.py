"""Autograd functions whose ONNX form is QuantizeLinear / DequantizeLinear.

In PyTorch they compute exactly what the fake quantizer computes; when traced by ``torch.onnx.export``
their ``symbolic`` emits the standard Q/DQ nodes, so ONNX Runtime and TensorRT see real integer tensors:

* ``QDQ``: float activation → ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)``.
* ``DQ``: integer constant (int8 weight codes, int32 bias codes) → ``DequantizeLinear(q, s, z)``.
* ``DQLowBit``: the same for ≤ 4-bit weight codes or blocked (per-group) qparams; it exports as a ``lowbit::``
  placeholder that ``lowbit.export.onnx_int4`` rewrites into opset-21 int4 / uint4 nodes. (Activations of
  ≤ 4 bits keep int8 / uint8 Q/DQ: ONNX Runtime 1.32 fuses a uint4 activation into QLinearConv and then
  refuses its own graph.)

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


# Codes of at most this many bits are stored packed two per byte (ONNX int4 / uint4, opset 21); 2- and 3-bit codes
# use the same containers, ONNX having no narrower type.
PACKED_BITS = 4
LOWBIT_DOMAIN = "lowbit"


def needs_lowbit_form(bits: int, block_size: int | None = None) -> bool:
    """True when a tensor needs the opset-21 form: codes of ≤ 4 bits (int4 / uint4) or blocked qparams."""
    return bits <= PACKED_BITS or block_size is not None


def expand_blocked(param: torch.Tensor, ndim: int, axis: int | None, block_size: int | None, size: int) -> torch.Tensor:
    """Broadcastable qparams: scalar (per-tensor), ``[C]`` → ``[1,..,C,..,1]`` (per-axis), or blocked.

    Blocked (ONNX ``block_size`` B along ``axis``): ``param`` has the tensor's rank with ``ceil(D / B)`` along
    ``axis``; element ``i`` along ``axis`` uses ``param[i // B]``.
    """
    if axis is None:
        return param
    if block_size is None:
        shape = [1] * ndim
        shape[axis] = -1
        return param.reshape(shape)
    return param.repeat_interleave(block_size, dim=axis).narrow(axis, 0, size)


def _lowbit_attrs(axis, block_size, bits, signed, integer_kernel=False) -> dict:
    attrs = {"bits_i": bits, "signed_i": int(signed), "integer_kernel_i": int(integer_kernel)}
    if axis is not None:
        attrs["axis_i"] = axis
    if block_size is not None:
        attrs["block_size_i"] = block_size
    return attrs


class DQLowBit(torch.autograd.Function):
    """``DequantizeLinear`` of a ≤ 4-bit or blocked integer constant (codes travel as int8 / uint8).

    ``x̂ = (q - z) · s`` with ``s``, ``z`` expanded by :func:`expand_blocked`. The ONNX form is a placeholder
    ``lowbit::DequantizeLinear`` node (attributes ``axis``, ``block_size``, ``bits``, ``signed``,
    ``integer_kernel``: the layer's input is quantized too, so an integer kernel can take this weight) that
    ``lowbit.export.onnx_int4`` rewrites into standard opset-21 nodes with packed codes.
    """

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis, block_size, bits, signed, integer_kernel=False):  # noqa: D102
        dim = q.shape[axis] if axis is not None else 0
        s = expand_blocked(scale, q.ndim, axis, block_size, dim)
        z = expand_blocked(zero_point, q.ndim, axis, block_size, dim)
        return (q.to(torch.float32) - z.to(torch.float32)) * s

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, block_size, bits, signed, integer_kernel=False):  # noqa: D102
        out = g.op(f"{LOWBIT_DOMAIN}::DequantizeLinear", q, scale, zero_point,
                   **_lowbit_attrs(axis, block_size, bits, signed, integer_kernel))
        out.setType(q.type().with_dtype(torch.float32))  # a known shape: Conv's exporter needs the kernel size
        return out



class QDQRescaled(torch.autograd.Function):
    """``DequantizeLinear(QuantizeLinear(x, s, z), s_out, z)``: codes read back with another (per-tensor) scale.

    ``x̂ = (clamp(rne(x / s) + z, qmin, qmax) - z) · s_out``; with ``s_out = s / k`` this is ``Q/DQ(x) / k`` folded
    into the dequantization (no float op between the two integer kernels around it).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, scale_out, qmin, qmax):  # noqa: D102
        z = zero_point.to(torch.float32)
        return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale_out

    @staticmethod
    def symbolic(g, x, scale, zero_point, scale_out, qmin, qmax):  # noqa: D102
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale_out, zero_point)
