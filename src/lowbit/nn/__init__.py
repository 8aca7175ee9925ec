"""Quantized modules: the ``TensorQuantizer`` and quantized twins of Conv / Linear layers."""

from lowbit.nn.modules import (
    QUANT_MODULES,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLayerMixin,
    QuantLinear,
    from_float,
)
from lowbit.nn.quantizer import QuantState, Requantize, TensorQuantizer, quantizers_disabled, unsigned_variant

__all__ = [
    "QUANT_MODULES", "QuantConv1d", "QuantConv2d", "QuantConvTranspose2d", "QuantLayerMixin", "QuantLinear",
    "QuantState", "Requantize", "TensorQuantizer", "from_float", "quantizers_disabled", "unsigned_variant",
]
