"""Module forms of functional ops whose quantized engine kernels are emulated exactly (``QuantAdd``,
``QuantHardSigmoid``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import PerTensor
from lowbit.nn.kernels import codes_of, qlinear_add
from lowbit.nn.onnx_ops import DQ, QDQRescaled
from lowbit.nn.quantizer import TensorQuantizer


class QuantAdd(nn.Module):
    """``a + b``; when both inputs and the output are quantized, ONNX Runtime's QLinearAdd bit for bit.

    The quantizers are owned by the graph; this module only keeps references to them.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name
        self.__dict__["_quantizers"] = None

    def set_engine_quantizers(self, q_a: TensorQuantizer, q_b: TensorQuantizer, q_c: TensorQuantizer) -> None:
        """The quantizers of the two inputs and of the output."""
        self.__dict__["_quantizers"] = (q_a, q_b, q_c)

    def _ready(self) -> bool:
        qs = self.__dict__["_quantizers"]
        return (
            qs is not None and all(q.is_active and isinstance(q.spec.granularity, PerTensor) for q in qs)
            and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self._ready():
            return a + b
        q_a, q_b, q_c = self.__dict__["_quantizers"]
        z_a, z_b, z_c = (int(q.zero_point) for q in (q_a, q_b, q_c))
        codes_a = codes_of(a, q_a.scale) + z_a
        codes_b = codes_of(b, q_b.scale) + z_b
        q = qlinear_add(codes_a, q_a.scale, z_a, codes_b, q_b.scale, z_b, q_c.scale, z_c, q_c.spec.qmin, q_c.spec.qmax)
        return ((q - z_c) * q_c.scale.reshape(())).float()


HARDSIGMOID_SHIFT = 3.0  # hardsigmoid(x) = clamp(x + 3, 0, 6) / 6


class QuantHardSigmoid(nn.Module):
    """``hardsigmoid(x) = relu6(x + 3) / 6`` on integer kernels (ONNX Runtime has no integer HardSigmoid).

    ``x + 3`` is a QLinearAdd of ``x``'s codes and a one-code constant (``q = 1``, ``s = 3``); the quantizer of
    ``relu6(x + 3)`` (its real range starts at 0, so its lowest code is real 0 and its highest is at most 6)
    saturates exactly where ReLU6 clips; the division by 6 moves into the scale that reads the codes back::

        q_r = QLinearAdd(q_x, 1; s_x, 3 → s_r, z_r),   hardsigmoid(x̂) ≈ (q_r - z_r) · fl32(s_r / 6)

    Both quantizers belong to the graph (the one of ``relu6(x + 3)`` calibrates through this module); they are
    linked with :meth:`set_engine_quantizers`.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name
        self.__dict__["_quantizers"] = (None, None)

    def set_engine_quantizers(self, q_x: TensorQuantizer, q_r: TensorQuantizer) -> None:
        """The quantizers of the input and of ``relu6(x + 3)``."""
        self.__dict__["_quantizers"] = (q_x, q_r)

    @property
    def quantizer(self) -> TensorQuantizer:
        """The quantizer of ``relu6(x + 3)``."""
        return self.__dict__["_quantizers"][1]

    def read_back_scale(self) -> torch.Tensor:
        """``fl32(s_r / 6)``: the scale the codes of ``relu6(x + 3)`` are read back with."""
        return self.quantizer.scale.reshape(()).float() / 6.0

    def _ready(self) -> bool:
        q_x, q = self.__dict__["_quantizers"]
        return (q_x is not None and q_x.is_active and q.is_active and isinstance(q_x.spec.granularity, PerTensor)
                and not q.export_mode and not torch.is_grad_enabled() and not torch.jit.is_tracing())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q_x, q = self.__dict__["_quantizers"]
        if not q.is_active:  # float; while calibrating, q observes relu6(x + 3); the FP32 file keeps HardSigmoid
            q(torch.clamp(x + HARDSIGMOID_SHIFT, 0.0, 6.0))
            return F.hardsigmoid(x)
        if q.export_mode:
            return self._export_forward(x)
        if not self._ready():
            return q(torch.clamp(x + HARDSIGMOID_SHIFT, 0.0, 6.0)) / 6.0
        z_x, z = int(q_x.zero_point), int(q.zero_point)
        codes = qlinear_add(codes_of(x, q_x.scale) + z_x, q_x.scale, z_x, torch.ones_like(x), HARDSIGMOID_SHIFT, 0,
                            q.scale, z, q.spec.qmin, q.spec.qmax)
        return ((codes - z) * self.read_back_scale()).float()

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        t = q.export_tensors()
        one = torch.ones((), dtype=torch.uint8)
        shift = DQ.apply(one, torch.tensor(HARDSIGMOID_SHIFT), torch.zeros((), dtype=torch.uint8), None)
        return QDQRescaled.apply(x + shift, t["scale"], t["zp"], self.read_back_scale(), q.spec.qmin, q.spec.qmax)
