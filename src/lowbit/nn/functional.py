"""Module forms of functional ops whose quantized engine kernel is emulated exactly (``QuantAdd``)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.core import PerTensor
from lowbit.nn.engine import codes_of, qlinear_add
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
