"""Quantization math: specs, affine quantize/dequantize, straight-through fake quantization, MSE fits."""

from lowbit.core.affine import (
    SCALE_EPS,
    choose_qparams,
    dequantize,
    expand_qparams,
    group_view,
    quantize,
    quantize_dequantize,
    reduce_dims,
)
from lowbit.core.mse import grid_search_qparams, lsq_fit_qparams, minmax_qparams
from lowbit.core.spec import PerChannel, PerGroup, PerTensor, QuantSpec, check_bits, qrange
from lowbit.core.ste import fake_quantize

__all__ = [
    "SCALE_EPS", "PerChannel", "PerGroup", "PerTensor", "QuantSpec", "check_bits", "choose_qparams",
    "dequantize", "expand_qparams", "fake_quantize", "grid_search_qparams", "group_view", "lsq_fit_qparams",
    "minmax_qparams", "qrange", "quantize", "quantize_dequantize", "reduce_dims",
]
