"""Weight-only quantized embedding tables: int8 codes gathered first, dequantized after (per row)::

    e = E[ids]  →  ê = (C[ids] - 0) · s[ids]          C = clamp(rne(E / s), qmin, qmax),  s_r = max_k |E_rk| / qmax

Only the rows a batch looks up are dequantized, so the table stays int8 at run time as well as on disk.
Its ONNX form is ``Gather(C, ids) → Cast → Mul(Gather(s, ids))`` (the layout ONNX Runtime's own dynamic
quantizer gives embedding tables, with one scale per row instead of one per table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import PerChannel, QuantSpec
from lowbit.nn.quantizer import TensorQuantizer


class GatherDQFn(torch.autograd.Function):
    """``codes[ids] · scale[ids]`` whose ONNX form is Gather / Cast / Gather / Mul."""

    @staticmethod
    def forward(ctx, ids, codes, scale):  # noqa: D102
        return F.embedding(ids, codes).to(torch.float32) * F.embedding(ids, scale.reshape(-1, 1))

    @staticmethod
    def symbolic(g, ids, codes, scale):  # noqa: D102
        rows = g.op("Cast", g.op("Gather", codes, ids, axis_i=0), to_i=1)  # 1 = FLOAT
        return g.op("Mul", rows, g.op("Gather", g.op("Unsqueeze", scale, g.op("Constant", value_t=torch.tensor([1]))),
                                      ids, axis_i=0))


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with an int8 (per-row, symmetric) table; ``from_float`` / ``to_float`` as the other layers."""

    _float_class = nn.Embedding

    @classmethod
    def from_float(cls, mod: nn.Embedding, name: str, spec: QuantSpec) -> QuantEmbedding:
        if not spec.symmetric or not spec.signed or spec.bits > 8:
            raise ValueError(f"layer {name}: quantized embeddings need a signed symmetric spec of at most 8 bits")
        if mod.max_norm is not None:
            raise ValueError(f"layer {name}: embeddings with max_norm cannot be quantized (the table changes at run time)")
        new = cls.__new__(cls)
        new.__dict__ = mod.__dict__.copy()
        new._parameters, new._buffers, new._modules = dict(mod._parameters), dict(mod._buffers), dict(mod._modules)
        new.layer_name = name
        wq = TensorQuantizer(QuantSpec(bits=spec.bits, granularity=PerChannel(0)), f"{name}.weight_quantizer")
        wq.start_calibration()
        wq.observe(mod.weight.detach())
        wq.freeze()
        new.weight_quantizer = wq
        with torch.no_grad():
            new.register_buffer("codes", wq.quantize_codes(mod.weight.detach()).to(torch.int8), persistent=False)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return GatherDQFn.apply(ids, self.codes, self.weight_quantizer.scale.reshape(-1))

    def to_float(self) -> nn.Embedding:
        """The float embedding, sharing this module's parameters."""
        base = nn.Embedding.__new__(nn.Embedding)
        base.__dict__ = self.__dict__.copy()
        base._modules = {k: v for k, v in self._modules.items() if k != "weight_quantizer"}
        base._buffers = {k: v for k, v in self._buffers.items() if k != "codes"}
        base.__dict__.pop("layer_name", None)
        return base


__all__ = ["GatherDQFn", "QuantEmbedding"]
