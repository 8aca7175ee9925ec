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
from lowbit.nn.forms import engine_emulation, export_form, instance_overrides, set_engine_emulation

__all__ = [
    "QUANT_MODULES", "QuantConv1d", "QuantConv2d", "QuantConvTranspose2d", "QuantLayerMixin", "QuantLinear",
    "QuantState", "Requantize", "TensorQuantizer", "engine_emulation", "export_form", "from_float", "quantizers_disabled",
    "instance_overrides", "set_engine_emulation", "unsigned_variant",
]
