"""Zero padding is crossed by the quantizer before it, whatever the zero-point: one quantizer, not a second one
after the pad that would re-round codes ONNX Runtime rounds once (EfficientNet-B0's TF-'same' pads after SiLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.export.runtime import optimized_op_types
from lowbit.nn import TensorQuantizer


class SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        x = F.silu(self.c1(x))  # signed, asymmetric: zero-point != 0
        x = self.c2(F.pad(x, (0, 1, 0, 1)))
        return self.c3(self.pad(F.silu(x)))


def test_one_quantizer_before_each_pad_and_exact_parity(tmp_path):
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 17, 17)
    q = lowbit.quantize(SamePadNet().eval(), list(calib.split(8)), lowbit.preset("int8"), calib[:1],
                        show_progress=False)
    for node in q.graph.nodes:
        if (node.op == "call_function" and node.target is F.pad) or \
                (node.op == "call_module" and isinstance(q.get_submodule(node.target), nn.ZeroPad2d)):
            before = node.args[0]
            assert before.op == "call_module" and isinstance(q.get_submodule(before.target), TensorQuantizer)
            assert int(q.get_submodule(before.target).zero_point) != 0
            assert all(not (u.op == "call_module" and isinstance(q.get_submodule(u.target), TensorQuantizer))
                       for u in node.users)  # no second quantizer after the pad
    path = lowbit.export_onnx(q, calib[:1], tmp_path / "m.onnx", check_parity=False)
    ops = optimized_op_types(path)
    assert ops["QLinearConv"] == 3 and "Pad" not in ops
    x = torch.randn(16, 3, 17, 17)
    par = lowbit.check_onnx_parity(q, path, x)
    assert par.fraction_within_step == 1.0 and par.segment is None
