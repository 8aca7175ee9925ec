"""Weight-only 4-bit export: quantized Linear layers become ONNX Runtime's ``MatMulNBits`` (com.microsoft).

A Linear whose frozen weight quantizer is 4-bit, signed, symmetric and per group along the input dimension
(``PerGroup(size, axis=1)``, ``size`` a power of two ≥ 16), and whose input is not quantized, is exported as::

    Y = MatMulNBits(X, B, scales, K, N, bits=4, block_size) + bias
    B[n, b, j] = u[n, b·size + 2j] | u[n, b·size + 2j + 1] << 4      (u = q + 8 ∈ [0, 15], K padded with 8)
    W[n, k]    = (u[n, k] − 8) · scales[n, k // size]                 (zero point 8: the op's default)

so two weights share a byte on disk and ONNX Runtime multiplies without materialising the float matrix.
``accuracy_level=0`` keeps ONNX Runtime's float arithmetic on the activations (matches the simulation);
``4`` lets it quantize activations to int8 per block (faster on CPUs with integer dot products).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.device import on_cpu
from lowbit.core import PerGroup
from lowbit.export.onnx_dynamic import trace_to_onnx
from lowbit.export.onnx_static import DEFAULT_OPSET, atomic_write_bytes
from lowbit.nn import QuantLinear

log = logging.getLogger(__name__)

NBITS = 4
ZERO = 2 ** (NBITS - 1)


def pack_int4(codes: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[N, K]`` signed 4-bit codes → ``[N, ceil(K / block), block / 2]`` uint8 (see module docstring)."""
    n, k = codes.shape
    blocks = -(-k // block_size)
    u = torch.full((n, blocks * block_size), ZERO, dtype=torch.int64)
    u[:, :k] = codes.to(torch.int64) + ZERO
    if u.min() < 0 or u.max() > 15:
        raise ValueError("pack_int4: codes outside the signed 4-bit range [-8, 7]")
    pairs = u.reshape(n, blocks, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[N, K]`` signed codes (int64)."""
    p = packed.to(torch.int64)
    u = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return u[:, :k] - ZERO


class MatMulNBitsFn(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` unpacked from ``packed`` / ``scales``; its ONNX form is ``MatMulNBits (+ Add)``."""

    @staticmethod
    def forward(ctx, x, packed, scales, bias, k, block_size, accuracy_level):  # noqa: D102
        codes = unpack_int4(packed, k).to(torch.float32)
        w = codes * scales.reshape(packed.shape[0], -1).repeat_interleave(block_size, dim=1)[:, :k]
        return F.linear(x, w, bias)

    @staticmethod
    def symbolic(g, x, packed, scales, bias, k, block_size, accuracy_level):  # noqa: D102
        n = packed.type().sizes()[0]
        y = g.op("com.microsoft::MatMulNBits", x, packed, scales, K_i=k, N_i=n, bits_i=NBITS,
                 block_size_i=block_size, accuracy_level_i=accuracy_level)
        if bias is None or (hasattr(bias, "node") and bias.node().mustBeNone()):
            return y
        return g.op("Add", y, bias)


class NBitsLinear(nn.Module):
    """Export-only stand-in for a weight-only 4-bit QuantLinear (packed weights, per-block scales)."""

    def __init__(self, layer: QuantLinear, accuracy_level: int = 0) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        self.k, self.block_size, self.accuracy_level = layer.in_features, wq.spec.granularity.size, accuracy_level
        with torch.no_grad():
            self.register_buffer("packed", pack_int4(wq.quantize_codes(layer.weight), self.block_size))
            self.register_buffer("scales", wq.scale.detach().to(torch.float32).reshape(-1).clone())
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MatMulNBitsFn.apply(x, self.packed, self.scales, self.bias, self.k, self.block_size, self.accuracy_level)


def nbits_eligible(layer: nn.Module) -> bool:
    """True for a QuantLinear with a frozen 4-bit signed symmetric per-input-group weight and a float input."""
    if not isinstance(layer, QuantLinear) or not layer.weight_quantizer.is_active:
        return False
    spec = layer.weight_quantizer.spec
    g = spec.granularity
    size_ok = isinstance(g, PerGroup) and g.axis % 2 == 1 and g.size >= 16 and g.size & (g.size - 1) == 0
    return (spec.bits == NBITS and spec.signed and spec.symmetric and size_ok
            and layer.effective_input_quantizer() is None)


def to_nbits_model(model: nn.Module, accuracy_level: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every eligible layer replaced by :class:`NBitsLinear`; also their names."""
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if nbits_eligible(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, NBitsLinear(model.get_submodule(name), accuracy_level))
    return model, names


def export_nbits_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, accuracy_level: int = 0,
                      opset: int = DEFAULT_OPSET) -> Path:
    """Export a weight-only 4-bit model with ``MatMulNBits`` (other quantized layers as Q/DQ).

    Raises:
        ValueError: when no layer is eligible (the message says what is needed).
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
    model, example = on_cpu(model), example.cpu()  # traced on the CPU; the caller's model stays put
    packed_model, names = to_nbits_model(model, accuracy_level)
    if not names:
        raise ValueError("export_nbits_onnx: no Linear has a frozen 4-bit signed symmetric per-group weight "
                         "(group along the input, power of two >= 16) with a float input")
    proto = trace_to_onnx(packed_model, example, opset, custom_opsets={"com.microsoft": 1})
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    log.info("wrote %s: %d MatMulNBits layers", path, len(names))
    return path


__all__ = ["MatMulNBitsFn", "NBitsLinear", "export_nbits_onnx", "nbits_eligible", "pack_int4", "to_nbits_model",
           "unpack_int4"]
