"""Dynamic quantization: int8 weights fixed offline, activations quantized at run time, integer matmuls.

For one product ``y = x Wᵀ + b`` (``x`` viewed as ``[M, K]`` tokens × features)::

    per tensor:  lo = min(min x, 0), hi = max(max x, 0),  s = (hi - lo) / 255  (s = 1 when hi = lo)
                 z = clamp(rne(-lo / s), 0, 255),        q = clamp(rne(x / s) + z, 0, 255)     (uint8)
    per token:   m_r = max(max_k |x_rk|, 2^-126) per row r of the [M, K] view; the row-normalised x / m is
                 quantized per tensor as above and the product is multiplied back by m_r (row scale m_r · s)
    y = fl32(Σ_k (q - z) · q_w) · fl32(s · s_w) [· m_r] + b      (int32 accumulate; s_w per output channel)

Per tensor this is ONNX ``DynamicQuantizeLinear`` followed by ``MatMulInteger`` and the float rescale —
the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul`` — and the accumulation here is exact, so the
simulation computes what the engine computes. Weights are symmetric (``z_w = 0``), per output channel by
default; use 7-bit weights on x86 CPUs without VNNI, whose u8×s8 kernels saturate 8-bit products.

Modules: :class:`QuantDynamicLinear`, :class:`QuantDynamicLSTM`, :class:`QuantDynamicGRU` (each made with
``from_float`` and undone with ``to_float``); both recurrent modules quantize ``x_t`` and ``h_{t-1}`` at
every step. In export mode the products become the ONNX nodes above (see ``lowbit.export.onnx_dynamic``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import PerChannel, PerTensor, QuantSpec, choose_qparams
from lowbit.nn.quantizer import TensorQuantizer

ACT_QMIN, ACT_QMAX = 0, 255
FLOAT32_EXACT = 2**24
TINY = float(torch.finfo(torch.float32).tiny)  # 2^-126


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time uint8 scale and zero-point of a whole tensor (ONNX ``DynamicQuantizeLinear``, see above)."""
    return choose_qparams(x.min(), x.max(), ACT_QMIN, ACT_QMAX, symmetric=False)


def row_scale(x2d: torch.Tensor) -> torch.Tensor:
    """Per-token factor ``m_r = max(max_k |x_rk|, 2^-126)`` of a ``[M, K]`` tensor, shape ``[M, 1]``."""
    return torch.clamp(x2d.abs().amax(dim=1, keepdim=True), min=TINY)


def dynamic_codes(x2d: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``q - z`` as float (exact small integers): ``clamp(rne(x / s) + z, 0, 255) - z``."""
    z = zp.to(torch.float32)
    return torch.clamp(torch.round(x2d / scale) + z, ACT_QMIN, ACT_QMAX) - z


def integer_matmul(a: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w_codesᵀ`` of integer-valued float tensors (float32 when every sum is below 2^24, else float64)."""
    bound = float(a.abs().max()) * float(w_codes.abs().sum(dim=1).max()) if a.numel() else 0.0
    dtype = torch.float32 if bound < FLOAT32_EXACT else torch.float64
    return (a.to(dtype) @ w_codes.to(dtype).t()).to(torch.float32)


def dynamic_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   per_token: bool = False) -> torch.Tensor:
    """Dynamically quantized ``x Wᵀ + b`` (see the module docstring).

    Args:
        x: ``[..., K]`` float input.
        w_codes: ``[N, K]`` integer weight codes (float or integer dtype), zero-point 0.
        w_scale: ``[N]`` (per channel) or scalar weight scale.
        bias: ``[N]`` float bias, or None.
        per_token: one scale per row of the ``[M, K]`` view instead of one per tensor.
    """
    x2d = x.reshape(-1, x.shape[-1])
    m = row_scale(x2d) if per_token else None
    if m is not None:
        x2d = x2d / m
    scale, zp = dynamic_qparams(x2d)
    acc = integer_matmul(dynamic_codes(x2d, scale, zp), w_codes.to(torch.float32))
    y = acc * (scale.to(torch.float32) * w_scale.to(torch.float32).reshape(-1))
    if m is not None:
        y = y * m
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_codes.shape[0])


def weight_quantizer_for(weight: torch.Tensor, spec: QuantSpec, name: str) -> TensorQuantizer:
    """A frozen quantizer of ``weight`` (symmetric, per-tensor or per output channel)."""
    if not spec.symmetric or not spec.signed:
        raise ValueError(f"{name}: dynamic quantization needs signed symmetric weights (zero-point 0)")
    g = spec.granularity
    if not isinstance(g, PerTensor) and not (isinstance(g, PerChannel) and g.axis % weight.ndim == 0):
        raise ValueError(f"{name}: dynamic weights are per-tensor or per output channel (axis 0), got {g!r}")
    q = TensorQuantizer(spec, name)
    q.start_calibration()
    q.observe(weight)
    q.freeze()
    return q


class DynamicQLinearFn(torch.autograd.Function):
    """Dynamic product ``y = x Wᵀ + b`` (``w_t`` = int8 codes ``[K, N]``); its ONNX form is
    ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(s · s_w) → Add(b)`` (ONNX Runtime fuses the first
    four into ``DynamicQuantizeMatMul``). Per token: ``m = Max(ReduceMax(Abs(x)), 2^-126)`` and ``x / m`` feed
    the same nodes, whose output is multiplied by ``m`` before the bias is added.
    """

    @staticmethod
    def forward(ctx, x, w_t, w_scale, bias, per_token):  # noqa: D102
        return dynamic_linear(x, w_t.t(), w_scale, bias, per_token)

    @staticmethod
    def symbolic(g, x, w_t, w_scale, bias, per_token):  # noqa: D102
        m = None
        if per_token:
            tiny = g.op("Constant", value_t=torch.tensor(TINY, dtype=torch.float32))
            m = g.op("Max", _reduce_max_last(g, g.op("Abs", x)), tiny)
            x = g.op("Div", x, m)
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("Cast", g.op("MatMulInteger", xq, w_t, xz), to_i=1)  # 1 = FLOAT
        y = g.op("Mul", acc, g.op("Mul", xs, w_scale))
        if m is not None:
            y = g.op("Mul", y, m)
        return y if _is_none(bias) else g.op("Add", y, bias)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _reduce_max_last(g, x):
    if g.opset >= 18:
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        return g.op("ReduceMax", x, axes, keepdims_i=1)
    return g.op("ReduceMax", x, axes_i=[-1], keepdims_i=1)


class DynamicMixin:
    """Shared state of the dynamic modules: frozen weight quantizers, the activation mode, export tensors."""

    def _init_dynamic(self, name: str, weight_spec: QuantSpec, per_token: bool, weight_names: tuple[str, ...]) -> None:
        self.layer_name = name
        self.per_token = per_token
        self.weight_spec = weight_spec
        self.export_mode = False
        self.weight_quantizers = nn.ModuleDict({
            w: weight_quantizer_for(getattr(self, w).detach(), weight_spec, f"{name}.{w}") for w in weight_names
        })

    def weight_codes(self, wname: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int8 codes [N, K], scale [N])`` of weight ``wname``."""
        q = self.weight_quantizers[wname]
        w = getattr(self, wname).detach()
        codes = q.quantize_codes(w).to(torch.int8)
        return codes, q.scale.reshape(-1).expand(w.shape[0]).contiguous()

    def prepare_codes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Integer weight codes and scales of every weight, computed once and cached."""
        cache = self.__dict__.get("_codes_cache")
        if cache is None:
            with torch.no_grad():
                cache = {w: self.weight_codes(w) for w in self.weight_quantizers}
            self.__dict__["_codes_cache"] = cache
        return cache

    def _product(self, x: torch.Tensor, wname: str, bias: torch.Tensor | None) -> torch.Tensor:
        codes, scale = self.prepare_codes()[wname]
        if self.export_mode:
            return DynamicQLinearFn.apply(x, codes.t().contiguous(), scale, bias, self.per_token)
        return dynamic_linear(x, codes, scale, bias, self.per_token)

    def refresh_codes(self) -> None:
        """Forget cached weight codes (call after changing a weight or a weight quantizer)."""
        self.__dict__.pop("_codes_cache", None)

    def extra_repr(self) -> str:
        s = self.weight_spec
        mode = "per-token" if self.per_token else "per-tensor"
        return f"{self.layer_name}: dynamic uint8 {mode} activations, int{s.bits} {type(s.granularity).__name__} weights"

    def to_float(self) -> nn.Module:
        """The float module, sharing this module's parameters."""
        base = self._float_class.__new__(self._float_class)
        base.__dict__ = self.__dict__.copy()
        base._modules = {k: v for k, v in self._modules.items() if k != "weight_quantizers"}
        for key in ("layer_name", "per_token", "weight_spec", "export_mode", "_codes_cache"):
            base.__dict__.pop(key, None)
        return base


def _swap(mod: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__ = mod.__dict__.copy()
    new._parameters, new._buffers, new._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
    return new


class QuantDynamicLinear(DynamicMixin, nn.Linear):
    """Linear with int8 weights and dynamically quantized uint8 inputs."""

    _float_class = nn.Linear

    @classmethod
    def from_float(cls, mod: nn.Linear, name: str, weight_spec: QuantSpec, per_token: bool = False):
        new = _swap(mod, cls)
        new._init_dynamic(name, weight_spec, per_token, ("weight",))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, "weight", self.bias)


def _check_rnn(mod: nn.RNNBase, name: str) -> None:
    if mod.bidirectional or getattr(mod, "proj_size", 0):
        raise ValueError(f"layer {name}: dynamic {type(mod).__name__} supports unidirectional layers without projection only")


def _rnn_weight_names(mod: nn.RNNBase) -> tuple[str, ...]:
    return tuple(f"weight_{kind}_l{layer}" for layer in range(mod.num_layers) for kind in ("ih", "hh"))


class _DynamicRNN(DynamicMixin):
    """Step loop shared by the recurrent modules (``batch_first`` and ``num_layers`` as in PyTorch)."""

    n_states = 1

    @classmethod
    def from_float(cls, mod, name: str, weight_spec: QuantSpec, per_token: bool = False):
        _check_rnn(mod, name)
        new = _swap(mod, cls)
        new._init_dynamic(name, weight_spec, per_token, _rnn_weight_names(mod))
        return new

    def _bias(self, kind: str, layer: int) -> torch.Tensor | None:
        return getattr(self, f"bias_{kind}_l{layer}") if self.bias else None

    def forward(self, x: torch.Tensor, hx=None):
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
        states = hx if hx is not None else (zeros,) * self.n_states
        if self.n_states == 1 and isinstance(states, torch.Tensor):
            states = (states,)
        finals = []
        for layer in range(self.num_layers):
            state = tuple(s[layer] for s in states)
            outs = []
            for t in range(steps):
                state = self._cell(x[t], state, layer)
                outs.append(state[0])
            x = torch.stack(outs)
            finals.append(state)
        out = x.transpose(0, 1) if self.batch_first else x
        stacked = tuple(torch.stack([f[i] for f in finals]) for i in range(self.n_states))
        return out, (stacked if self.n_states > 1 else stacked[0])


class QuantDynamicLSTM(_DynamicRNN, nn.LSTM):
    """LSTM (gates i, f, g, o) whose ``W_ih x_t`` and ``W_hh h_{t-1}`` products are dynamically quantized."""

    _float_class = nn.LSTM
    n_states = 2

    def _cell(self, x_t, state, layer):
        h, c = state
        gates = self._product(x_t, f"weight_ih_l{layer}", self._bias("ih", layer))
        gates = gates + self._product(h, f"weight_hh_l{layer}", self._bias("hh", layer))
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class QuantDynamicGRU(_DynamicRNN, nn.GRU):
    """GRU (gates r, z, n) with dynamically quantized products: ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``."""

    _float_class = nn.GRU

    def _cell(self, x_t, state, layer):
        (h,) = state
        gi = self._product(x_t, f"weight_ih_l{layer}", self._bias("ih", layer))
        gh = self._product(h, f"weight_hh_l{layer}", self._bias("hh", layer))
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return ((1 - z) * n + z * h,)


DYNAMIC_MODULES: dict[type, type] = {nn.Linear: QuantDynamicLinear, nn.LSTM: QuantDynamicLSTM, nn.GRU: QuantDynamicGRU}


def dynamic_from_float(mod: nn.Module, name: str, weight_spec: QuantSpec, per_token: bool = False) -> nn.Module:
    """The dynamically quantized twin of a Linear / LSTM / GRU (sharing its parameters)."""
    cls = DYNAMIC_MODULES.get(type(mod))
    if cls is None:
        raise TypeError(f"layer {name}: no dynamic quantization for {type(mod).__name__} (Linear, LSTM, GRU)")
    return cls.from_float(mod, name, weight_spec, per_token)


__all__ = [
    "DYNAMIC_MODULES", "DynamicQLinearFn", "QuantDynamicGRU", "QuantDynamicLSTM", "QuantDynamicLinear",
    "dynamic_codes", "dynamic_from_float", "dynamic_linear", "dynamic_qparams", "integer_matmul",
]
