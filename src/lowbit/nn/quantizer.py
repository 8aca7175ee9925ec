"""``TensorQuantizer``: one module that observes a tensor, then fake-quantizes it with frozen qparams.

Its life has three states and refuses wrong transitions:

    initial ──start_calibration()──► calibrating ──freeze()──► frozen

* initial: passes the tensor through untouched.
* calibrating: streams the tensor into its observer (``update``) and passes it through in float.
* frozen: ``x̂ = (clamp(round(x / s) + z, qmin, qmax) - z) · s`` with the stored ``scale`` / ``zero_point``.

``enabled = False`` makes a frozen quantizer a pass-through (the analysis switches layers on and off
with it) without losing its qparams.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import replace

import torch
from torch import nn

from lowbit.core import QuantSpec, choose_qparams, expand_qparams, fake_quantize
from lowbit.core.spec import PerGroup, PerTensor
from lowbit.nn.onnx_ops import QDQ, code_dtype
from lowbit.observers import make_observer

log = logging.getLogger(__name__)


class QuantState(str, enum.Enum):
    """Life-cycle state of a quantizer."""

    INITIAL = "initial"
    CALIBRATING = "calibrating"
    FROZEN = "frozen"


class TensorQuantizer(nn.Module):
    """Observe, then fake-quantize, one tensor according to a :class:`QuantSpec`.

    Args:
        spec: how to quantize; ``None`` makes a permanent pass-through (a layer kept in float).
        name: qualified name used in error messages and reports.
        bounds: known range of the producer (``(0, 6)`` after ReLU6, ``(0, None)`` after ReLU); the
            calibrated range is intersected with it.
    """

    def __init__(self, spec: QuantSpec | None, name: str = "quantizer", bounds: tuple | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.qname = name
        self.bounds = bounds
        self.enabled = spec is not None
        self.export_mode = False
        self.state = QuantState.INITIAL
        self.observer = None
        self.register_buffer("scale", torch.ones(()), persistent=True)
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64), persistent=True)

    def extra_repr(self) -> str:
        if self.spec is None:
            return f"{self.qname}: float"
        s = self.spec
        sign = "int" if s.signed else "uint"
        kind = "sym" if s.symmetric else "asym"
        return f"{self.qname}: {sign}{s.bits} {kind} {type(s.granularity).__name__} {s.calibrator} [{self.state.value}]"

    @property
    def is_active(self) -> bool:
        """True when forward actually fake-quantizes."""
        return self.spec is not None and self.enabled and self.state is QuantState.FROZEN

    def start_calibration(self) -> None:
        """Enter the calibrating state with a fresh observer."""
        if self.spec is None:
            return
        if self.state is QuantState.FROZEN:
            raise RuntimeError(f"quantizer {self.qname} is frozen; call reset() before calibrating again")
        self.observer = make_observer(self.spec.calibrator, name=self.qname, granularity=self.spec.granularity)
        self.state = QuantState.CALIBRATING

    def reset(self) -> None:
        """Back to the initial state, forgetting statistics and qparams."""
        self.observer = None
        self.state = QuantState.INITIAL

    def observe(self, x: torch.Tensor) -> None:
        """Stream ``x`` into the observer (used for weights, which are observed once)."""
        if self.state is not QuantState.CALIBRATING:
            raise RuntimeError(f"quantizer {self.qname} is {self.state.value}, not calibrating")
        self.observer.update(x.detach())

    def calibrated_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's range intersected with the producer's known bounds."""
        lo, hi = self.observer.compute_range(self.spec)
        if self.bounds is not None:
            b_lo, b_hi = self.bounds
            if b_lo is not None:
                lo = torch.clamp(lo, min=b_lo)
                hi = torch.clamp(hi, min=b_lo)
            if b_hi is not None:
                hi = torch.clamp(hi, max=b_hi)
                lo = torch.clamp(lo, max=b_hi)
        return lo, hi

    def freeze(self) -> None:
        """Compute qparams from the observer and enter the frozen state."""
        if self.spec is None:
            return
        if self.state is not QuantState.CALIBRATING:
            raise RuntimeError(f"quantizer {self.qname} cannot freeze from state {self.state.value}")
        lo, hi = self.calibrated_range()
        scale, zp = choose_qparams(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        self.set_qparams(scale, zp)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store qparams (compact shape) and freeze; used by ``freeze`` and by passes that refine them."""
        if self.spec is None:
            raise RuntimeError(f"quantizer {self.qname} keeps its tensor in float and has no qparams")
        self.scale = scale.detach().to(torch.float32).clone()
        self.zero_point = zero_point.detach().to(torch.int64).clone()
        self.state = QuantState.FROZEN

    def expanded(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point broadcastable to a tensor of ``shape``."""
        g = self.spec.granularity
        return expand_qparams(self.scale, shape, g), expand_qparams(self.zero_point, shape, g)

    def quantize_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int64) under the frozen qparams."""
        s, z = self.expanded(x.shape)
        return torch.clamp(torch.round(x / s) + z, self.spec.qmin, self.spec.qmax).to(torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None or not self.enabled:
            return x
        if self.state is QuantState.CALIBRATING:
            self.observer.update(x.detach())
            return x
        if self.state is QuantState.INITIAL:
            return x
        if self.export_mode:
            return self._export_forward(x)
        s, z = self.expanded(x.shape)
        return fake_quantize(x, s, z, self.spec.qmin, self.spec.qmax)

    def typed_zero_point(self) -> torch.Tensor:
        """Zero-point in the integer dtype the ONNX graph uses for this quantizer."""
        return self.zero_point.to(code_dtype(self.spec.bits, self.spec.signed))

    def onnx_axis(self, ndim: int) -> int | None:
        """Q/DQ ``axis`` attribute (the channel axis, or the group axis of a blocked DQ), None for per-tensor."""
        g = self.spec.granularity
        if isinstance(g, PerTensor):
            return None
        return g.axis % ndim

    def onnx_block_size(self) -> int | None:
        """DequantizeLinear ``block_size`` (opset 21) for per-group qparams, else None."""
        g = self.spec.granularity
        return g.size if isinstance(g, PerGroup) else None

    def export_tensors(self) -> dict:
        """Scale, typed zero-point and axis as plain constants (computed once, before tracing)."""
        zp = self.typed_zero_point()
        if isinstance(self.spec.granularity, PerTensor):
            return {"scale": self.scale.reshape(()).clone(), "zp": zp.reshape(())}
        return {"scale": self.scale.clone(), "zp": zp}

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_block_size() is not None:
            raise NotImplementedError(f"quantizer {self.qname}: per-group activations cannot be exported")
        axis = self.onnx_axis(x.ndim)
        t = self.__dict__.get("_export_tensors") or self.export_tensors()
        return QDQ.apply(x, t["scale"], t["zp"], axis, self.spec.qmin, self.spec.qmax)


def unsigned_variant(spec: QuantSpec) -> QuantSpec:
    """The spec for a tensor known to be non-negative: unsigned codes, zero-point 0 (scale = max / qmax)."""
    return replace(spec, signed=False, symmetric=True)



@contextlib.contextmanager
def quantizers_disabled(model: nn.Module):
    """Run ``model`` in float: every quantizer passes its tensor through (qparams are kept)."""
    qs = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    before = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield model
    finally:
        for q, was in zip(qs, before):
            q.enabled = was


class Requantize(nn.Module):
    """A shared quantizer applied once more, after ops that only move data (flatten, reshape, view).

    ``Q(DQ(Q(x))) = Q(x)`` for the same qparams, so values do not change; the exported graph reads
    ``DQ → Flatten → Q → DQ → Gemm``, which ONNX Runtime runs on integer tensors end to end (the data-movement
    op between a DQ and a Q with equal qparams runs on the codes, and the consumer fuses its integer kernel).
    It never observes: while the quantizer calibrates, this passes the tensor through.
    """

    def __init__(self, quantizer: TensorQuantizer) -> None:
        super().__init__()
        self.__dict__["quantizer"] = quantizer  # owned by the graph, not by this module

    @property
    def source(self) -> TensorQuantizer:
        """The quantizer re-applied."""
        return self.__dict__["quantizer"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.source
        return q.forward(x) if q.is_active else x  # forward(): hooks see each quantizer once per pass
