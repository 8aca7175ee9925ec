"""Quantized wrappers of Conv1d / Conv2d / ConvTranspose2d / Linear.

Each wrapper *is* its float class (same parameters, same state-dict keys) plus three quantizers with the
same names everywhere: ``input_quantizer``, ``weight_quantizer``, ``output_quantizer``. ``from_float``
builds one from a float module, ``to_float`` gives the float module back. ``QUANT_MODULES`` maps float
class → quantized class.

When frozen, the forward pass is

    y = op(Q_in(x), Q_w(W), Q_b(b))          with Q_b(b) = round(b / (s_in · s_w)) · s_in · s_w

i.e. the bias is rounded to the int32 grid ONNX Runtime uses, so simulation and engine agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantSpec
from lowbit.core import PerTensor
from lowbit.nn.kernels import codes_of, exact_dtype, requantize
from lowbit.nn.onnx_ops import DQ, DQLowBit, code_dtype, needs_lowbit_form
from lowbit.nn.quantizer import TensorQuantizer

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Largest |bias code| we allow: engines add the int32 bias to the int32 accumulator, so leave 2^30 of room.
BIAS_CODE_LIMIT = 2**30


class QuantLayerMixin:
    """Shared behaviour of every quantized layer."""

    weight_axis: int = 0

    def _init_quantizers(self, name: str, weight: QuantSpec | None, inp: QuantSpec | None) -> None:
        self.layer_name = name
        self.input_quantizer = TensorQuantizer(inp, f"{name}.input_quantizer")
        self.weight_quantizer = TensorQuantizer(weight, f"{name}.weight_quantizer")
        self.output_quantizer = TensorQuantizer(None, f"{name}.output_quantizer")
        self.export_mode = False
        # The quantizer that actually quantizes this layer's input: our own, or a shared one placed on the
        # input tensor by the graph pass (kept out of the module tree on purpose: it is owned elsewhere).
        self.__dict__["_upstream_input_quantizer"] = None

    def set_upstream_input_quantizer(self, quantizer: TensorQuantizer | None) -> None:
        """Declare that ``quantizer`` (owned by the graph) quantizes this layer's input tensor."""
        self.__dict__["_upstream_input_quantizer"] = quantizer

    def set_engine_output(self, quantizer: TensorQuantizer | None) -> None:
        """Declare the quantizer the engine fuses onto this layer's output (QLinearConv / QLinearMatMul)."""
        self.__dict__["_engine_output"] = quantizer

    def _integer_inputs_ready(self) -> bool:
        """Input and weight quantized and frozen, per-tensor/per-channel weight, and a plain inference call."""
        return (
            self.effective_input_quantizer() is not None and self.weight_quantizer.is_active
            and not self.blocked_weight()
            and not self.export_mode and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        )

    def _engine_ready(self) -> bool:
        q_out = self.__dict__.get("_engine_output")
        return (q_out is not None and q_out.is_active and isinstance(q_out.spec.granularity, PerTensor)
                and self._integer_inputs_ready())

    def _engine_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bit-exact emulation of the engine's integer kernel + requantization (see ``nn.kernels``)."""
        q_in, q_out, wq = self.effective_input_quantizer(), self.__dict__["_engine_output"], self.weight_quantizer
        a, w = self._integer_operands(x)
        grid = self.bias_qparams()
        b = None
        if grid is not None:
            b = torch.clamp(torch.round(self.bias.detach() / grid[0]), INT32_MIN, INT32_MAX).float()
        dtype = exact_dtype(a, w, b, tuple(range(1, w.ndim)))
        acc = self._integer_op(a.to(dtype), w.to(dtype), None if b is None else b.to(dtype))
        z = int(q_out.zero_point)
        q = requantize(acc, q_in.scale, wq.scale, q_out.scale, z, q_out.spec.qmin, q_out.spec.qmax, self._channel_dim)
        return ((q - z) * q_out.scale.reshape(())).float()

    def _integer_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_x - z_x, q_w - z_w)`` as float tensors of exact integers, for an already fake-quantized input."""
        wq = self.weight_quantizer
        _, w_zp = wq.expanded(self.weight.shape)
        return codes_of(x, self.effective_input_quantizer().scale), (wq.quantize_codes(self.weight) - w_zp).float()

    _channel_dim = 1

    def _integer_op(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(a, w, b)

    def blocked_weight(self) -> bool:
        """True for per-group weights (blocked DequantizeLinear): no integer kernel takes them, the engine runs
        a float kernel on the dequantized weight (or MatMulNBits), so the float simulation is the right one."""
        wq = self.weight_quantizer
        return wq.spec is not None and wq.onnx_block_size() is not None

    def effective_input_quantizer(self) -> TensorQuantizer | None:
        """The active quantizer of this layer's input, wherever it lives, or None."""
        for q in (self.input_quantizer, self.__dict__["_upstream_input_quantizer"]):
            if q is not None and q.is_active:
                return q
        return None

    def bias_qparams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int32 bias grid ``s_b = s_in · s_w`` (per output channel), or None when not fully quantized.

        Per-group weights have no single scale per output channel: their bias stays float.
        """
        q_in = self.effective_input_quantizer()
        if self.bias is None or q_in is None or not self.weight_quantizer.is_active:
            return None
        if self.weight_quantizer.onnx_block_size() is not None:
            return None
        s_w = self.weight_quantizer.scale
        scale = (q_in.scale.reshape(()) * s_w).reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(self.bias.numel())
        return scale.contiguous(), torch.zeros(self.bias.numel(), dtype=torch.int32, device=scale.device)

    def fit_bias_range_(self) -> int:
        """Raise weight scales so every bias code fits: ``s_w ≥ |b| / (s_in · 2^30)`` (per output channel).

        A channel whose weights are almost zero (dead after BatchNorm folding) would otherwise get a tiny
        ``s_w`` and a bias code beyond int32, which engines wrap around. Returns the number of channels raised.
        """
        q_in, wq = self.effective_input_quantizer(), self.weight_quantizer
        if self.bias_qparams() is None or not wq.spec.symmetric:
            return 0
        need = self.bias.detach().abs() / (q_in.scale.reshape(()) * BIAS_CODE_LIMIT)
        scale = wq.scale if wq.scale.ndim else wq.scale.expand_as(need)
        raised = need > scale
        if raised.any():
            new = torch.maximum(scale, need)
            wq.set_qparams(new if wq.scale.ndim else new.max().reshape(()), wq.zero_point)
        return int(raised.sum().item())

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_bias(self) -> torch.Tensor | None:
        grid = self.bias_qparams()
        if grid is None:
            return self.bias
        s_b = grid[0]
        return torch.clamp(torch.round(self.bias / s_b), INT32_MIN, INT32_MAX) * s_b

    def export_tensors(self) -> dict[str, torch.Tensor | int | None]:
        """Integer weight / bias codes and their qparams as plain constants (computed once, before tracing).

        They must not be computed while ``torch.onnx.export`` traces, or the rounding would be traced as
        graph ops on float weights instead of becoming integer initializers.
        """
        wq = self.weight_quantizer
        with torch.no_grad():
            codes = wq.quantize_codes(self.weight).to(code_dtype(wq.spec.bits, wq.spec.signed))
            axis, block = wq.onnx_axis(self.weight.ndim), wq.onnx_block_size()
            zp = wq.typed_zero_point()
            out = {
                "w_codes": codes, "w_axis": axis, "w_block": block, "w_bits": wq.spec.bits, "w_signed": wq.spec.signed,
                "w_scale": wq.scale.clone() if axis is not None else wq.scale.reshape(()).clone(),
                "w_zp": zp if axis is not None else zp.reshape(()),
                "b_codes": None,
            }
            grid = self.bias_qparams()
            if grid is not None:
                s_b, z_b = grid
                out["b_codes"] = torch.clamp(torch.round(self.bias / s_b), INT32_MIN, INT32_MAX).to(torch.int32)
                out["b_scale"], out["b_zp"] = s_b.clone(), z_b
        return out

    def export_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as ``DequantizeLinear`` of integer constants (for ONNX export)."""
        if not self.weight_quantizer.is_active:
            return self.weight, self.bias
        t = self.__dict__.get("_export_tensors") or self.export_tensors()
        if needs_lowbit_form(t["w_bits"], t["w_block"]):
            weight = DQLowBit.apply(t["w_codes"], t["w_scale"], t["w_zp"], t["w_axis"], t["w_block"], t["w_bits"],
                                    t["w_signed"], self.effective_input_quantizer() is not None)
        else:
            weight = DQ.apply(t["w_codes"], t["w_scale"], t["w_zp"], t["w_axis"])
        if t["b_codes"] is None:
            return weight, self.bias
        return weight, DQ.apply(t["b_codes"], t["b_scale"], t["b_zp"], 0)

    def _weight_and_bias(self):
        if self.export_mode:
            return self.export_weight_and_bias()
        return self.quantized_weight(), self.quantized_bias()

    def to_float(self) -> nn.Module:
        """A plain float module sharing this layer's (float) parameters."""
        base = _copy_module(self)
        base.__class__ = self._float_class
        for key in ("input_quantizer", "weight_quantizer", "output_quantizer"):
            base._modules.pop(key, None)
        for key in ("layer_name", "export_mode", "_upstream_input_quantizer"):
            base.__dict__.pop(key, None)
        return base


def _swap_class(mod: nn.Module, cls: type, name: str, weight: QuantSpec | None, inp: QuantSpec | None):
    mod = _copy_module(mod)
    mod.__class__ = cls
    mod._init_quantizers(name, weight, inp)
    return mod


def _copy_module(mod: nn.Module) -> nn.Module:
    new = mod.__class__.__new__(mod.__class__)
    new.__dict__ = mod.__dict__.copy()
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = dict(mod._modules)
    return new


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """Conv1d with quantized input and weight (weight channel axis 0)."""

    _float_class = nn.Conv1d

    def forward(self, x):
        if self._engine_ready():
            return self._engine_forward(x)
        w, b = self._weight_and_bias()
        return self.output_quantizer(self._conv_forward(self.input_quantizer(x), w, b))


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Conv2d with quantized input and weight (weight channel axis 0)."""

    _float_class = nn.Conv2d

    def forward(self, x):
        if self._engine_ready():
            return self._engine_forward(x)
        w, b = self._weight_and_bias()
        return self.output_quantizer(self._conv_forward(self.input_quantizer(x), w, b))


class QuantConvTranspose2d(QuantLayerMixin, nn.ConvTranspose2d):
    """ConvTranspose2d with quantized input and weight (weight layout [in, out/groups, kh, kw]: axis 1)."""

    _float_class = nn.ConvTranspose2d
    weight_axis = 1

    def bias_qparams(self):
        grid = super().bias_qparams()
        if grid is None or self.groups == 1:
            return grid
        raise NotImplementedError(f"{self.layer_name}: grouped ConvTranspose2d is not supported")

    def forward(self, x, output_size=None):
        w, b = self._weight_and_bias()
        x = self.input_quantizer(x)
        pad = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        y = F.conv_transpose2d(x, w, b, self.stride, self.padding, pad, self.groups, self.dilation)
        return self.output_quantizer(y)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """Linear with quantized input and weight (weight channel axis 0)."""

    _float_class = nn.Linear
    _channel_dim = -1

    def _integer_op(self, a, w, b):
        return F.linear(a, w, b)

    def _matmul_to_float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ONNX Runtime's ``MatMulIntegerToFloat`` + float bias ``Add`` + ``QuantizeLinear``, bit for bit:
        ``y = fl32(acc) · fl32(s_x · s_w) + fl32(q_b · s_b)``, then the output quantizer (see ``nn.kernels``)."""
        q_in, wq = self.effective_input_quantizer(), self.weight_quantizer
        a, w = self._integer_operands(x)
        dtype = exact_dtype(a, w, None, tuple(range(1, w.ndim)))
        acc = F.linear(a.to(dtype), w.to(dtype)).float()
        y = acc * (q_in.scale.float().reshape(()) * wq.scale.float().reshape(-1))
        grid = self.bias_qparams()
        if grid is not None:
            y = y + torch.clamp(torch.round(self.bias.detach() / grid[0]), INT32_MIN, INT32_MAX) * grid[0]
        elif self.bias is not None:
            y = y + self.bias.detach()
        q_out = self.__dict__.get("_engine_output")
        return q_out(y) if q_out is not None else self.output_quantizer(y)

    def forward(self, x):
        # 2-D input exports as Gemm (QGemm: integer requantization); higher ranks export as MatMul + Add, which
        # ONNX Runtime runs as MatMulIntegerToFloat + float Add (+ Q): both emulated bit for bit.
        if x.dim() > 2 and self._integer_inputs_ready():
            return self._matmul_to_float_forward(x)
        if self._engine_ready():
            return self._engine_forward(x)
        w, b = self._weight_and_bias()
        return self.output_quantizer(F.linear(self.input_quantizer(x), w, b))


QUANT_MODULES: dict[type, type] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}


def from_float(mod: nn.Module, name: str, weight: QuantSpec | None, inp: QuantSpec | None) -> nn.Module:
    """The quantized twin of ``mod`` (sharing its parameters), with quantizers built from the specs."""
    cls = QUANT_MODULES.get(type(mod))
    if cls is None:
        raise TypeError(f"layer {name}: no quantized version of {type(mod).__name__}")
    return _swap_class(mod, cls, name, weight, inp)
