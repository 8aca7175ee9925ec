"""QAT twins of the quantized layers, with BatchNorm folding simulated during training.

A QAT layer *is* its PTQ class (``QuantConv2d`` …) with three changes: the engine emulation is off
(training needs gradients), the int32 bias rounding passes gradients straight through
(``b̂ = b + sg(round(b / s_b)·s_b − b)``, ``sg`` = stop-gradient), and, when a BatchNorm followed the layer,
the BN lives inside it as ``.bn`` and is folded on the fly (Jacob et al. 2018; torch.ao's ``ConvBn``):

    k   = γ · rsqrt(σ²_run + ε)                          (running statistics, one factor per channel)
    ŵ   = Q_w(W · k)                                     (the weight the deployed model will hold)
    training, BN live:   y = BN_batch(op(x, ŵ) / k + b)  (batch statistics; running ones are updated)
    eval or BN frozen:   y = op(x, ŵ) + Q_b((b − μ_run) · k + β)   (exactly the folded deployed layer)

``fold_`` makes the fold real and turns the layer back into its PTQ class, the same kind of model
``lowbit.prepare_`` + ``convert_`` produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLayerMixin, QuantLinear
from lowbit.nn.modules import INT32_MAX, INT32_MIN
from lowbit.qat.config import QATConfig
from lowbit.qat.sync import batch_norm_train
from lowbit.transforms.bn_fold import fold_into

BN_OUT_AXIS = 0  # weight output-channel axis of the layers that take a simulated BN (Conv1d, Conv2d, Linear)


class QATLayerMixin:
    """What every QAT layer adds to its PTQ class (see module docstring)."""

    _ptq_class: type

    def init_qat_(self, config: QATConfig, bn: nn.Module | None = None) -> None:
        """Attach the QAT schedule and (optionally) the BatchNorm to simulate."""
        self.qat_config = config
        if bn is not None:
            self.bn = bn
            self.register_buffer("qat_steps", torch.zeros((), dtype=torch.int64, device=self.weight.device))
            self._steps_cache = 0

    def _engine_ready(self) -> bool:
        return False

    def export_tensors(self) -> dict:
        raise RuntimeError(f"layer {self.layer_name} is still in QAT form: call lowbit.qat.convert_(model) before export")

    def _bias_grid(self, n: int) -> torch.Tensor | None:
        """int32 bias step ``s_b = s_in · s_w`` for ``n`` output channels, or None when not fully quantized."""
        q_in = self.effective_input_quantizer()
        if q_in is None or not self.weight_quantizer.is_active:
            return None
        return (q_in.scale.reshape(()) * self.weight_quantizer.scale).reshape(-1).expand(n)

    def _ste_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        grid = None if bias is None else self._bias_grid(bias.numel())
        if grid is None:
            return bias
        rounded = torch.clamp(torch.round(bias.detach() / grid), INT32_MIN, INT32_MAX) * grid
        return bias + (rounded - bias.detach())

    def quantized_bias(self) -> torch.Tensor | None:
        return self._ste_bias(self.bias)

    @property
    def has_bn(self) -> bool:
        return "bn" in self._modules

    def bn_frozen(self) -> bool:
        """True once the BatchNorm uses (and keeps) its running statistics."""
        step = self.qat_config.freeze_bn_step
        return step is not None and self.steps_done() >= step

    def steps_done(self) -> int:
        """Training steps of the simulated BatchNorm, from a host-side copy of ``qat_steps`` (no GPU wait per
        forward pass); refreshed when a checkpoint is loaded."""
        cached = self.__dict__.get("_steps_cache")
        if cached is None:
            cached = self._steps_cache = int(self.qat_steps)
        return cached

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.__dict__["_steps_cache"] = None  # qat_steps comes from the checkpoint
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, *args, **kwargs):
        if not self.has_bn:
            return super().forward(x, *args, **kwargs)
        return self._bn_forward(x)

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        k = torch.rsqrt(bn.running_var + bn.eps)  # the same arithmetic as transforms.bn_fold.fold_bn_weights
        return bn.weight * k if bn.affine else k

    def folded_weight(self) -> torch.Tensor:
        """``W · k`` with the running statistics (``W`` itself without a BatchNorm)."""
        if not self.has_bn:
            return self.weight
        shape = [1] * self.weight.ndim
        shape[BN_OUT_AXIS] = -1
        return self.weight * self._bn_factor().reshape(shape)

    def _bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, x = self.bn, self.input_quantizer(x)
        live = self.training and not self.bn_frozen()
        if self.training:
            self.qat_steps += 1
            self._steps_cache = self.steps_done() + 1
        k = self._bn_factor()
        w = self.weight_quantizer(self.folded_weight())
        y_shape = [1] * 2 + [1] * (x.ndim - 2)
        y_shape[1] = -1
        if live:
            y = self._op(x, w, None)
            safe_k = torch.where(k == 0, torch.ones_like(k), k)
            y = y / safe_k.reshape(y_shape)
            if self.bias is not None:
                y = y + self.bias.reshape(y_shape)
            y = batch_norm_train(y, bn)
        else:
            b = torch.zeros_like(bn.running_mean) if self.bias is None else self.bias
            b = (b - bn.running_mean) * k
            if bn.affine:
                b = b + bn.bias
            y = self._op(x, w, self._ste_bias(b))
        return self.output_quantizer(y)

    def fold_(self) -> nn.Module:
        """Fold the BatchNorm for real (running statistics) and become the PTQ class, in place."""
        if self.has_bn:
            fold_into(self, self.bn)
            del self._modules["bn"]
            self._buffers.pop("qat_steps", None)
        self.__dict__.pop("qat_config", None)
        self.__dict__.pop("_steps_cache", None)
        self.__class__ = self._ptq_class
        return self


class QATConv1d(QATLayerMixin, QuantConv1d):
    """Conv1d for QAT (optionally with a simulated BatchNorm)."""

    _ptq_class = QuantConv1d

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QATConv2d(QATLayerMixin, QuantConv2d):
    """Conv2d for QAT (optionally with a simulated BatchNorm)."""

    _ptq_class = QuantConv2d

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QATLinear(QATLayerMixin, QuantLinear):
    """Linear for QAT (optionally with a simulated BatchNorm1d on ``[N, C]`` outputs)."""

    _ptq_class = QuantLinear

    def _op(self, x, w, b):
        return F.linear(x, w, b)


class QATConvTranspose2d(QATLayerMixin, QuantConvTranspose2d):
    """ConvTranspose2d for QAT (a following BatchNorm is folded for real before training)."""

    _ptq_class = QuantConvTranspose2d


QAT_CLASSES: dict[type, type] = {
    QuantConv1d: QATConv1d, QuantConv2d: QATConv2d, QuantLinear: QATLinear, QuantConvTranspose2d: QATConvTranspose2d,
}
BN_SIMULATED = (QuantConv1d, QuantConv2d, QuantLinear)


def to_qat_(layer: QuantLayerMixin, config: QATConfig, bn: nn.Module | None = None) -> QATLayerMixin:
    """Turn a PTQ layer into its QAT twin in place (``bn``: a BatchNorm to simulate)."""
    cls = QAT_CLASSES.get(type(layer))
    if cls is None:
        raise TypeError(f"layer {getattr(layer, 'layer_name', '?')}: no QAT version of {type(layer).__name__}")
    if bn is not None and type(layer) not in BN_SIMULATED:
        raise TypeError(f"layer {layer.layer_name}: BatchNorm simulation needs Conv1d, Conv2d or Linear")
    layer.__class__ = cls
    layer.init_qat_(config, bn)
    return layer
