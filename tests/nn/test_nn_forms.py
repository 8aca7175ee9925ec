"""``lowbit.nn.engine_emulation`` / ``set_engine_emulation``: the one switch for the engine-kernel emulation."""

import torch
from torch import nn

import lowbit
from lowbit.nn import engine_emulation, set_engine_emulation


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) + y


def _quantized():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    q = lowbit.quantize(_Res().eval(), x, lowbit.preset("int8-per-tensor"), x[:1], show_progress=False)
    return q, x


def _layer_out(q, x):
    """Output of layer ``a`` alone: with the emulation on, the engine's fused QLinearConv (+ ReLU) codes."""
    return q.get_submodule("a")(x)


def test_off_is_plain_fake_quant_and_restored_on_exit():
    q, x = _quantized()
    with torch.no_grad():
        exact = _layer_out(q, x)
        assert exact.min() >= 0  # ReLU fused into the requantization
        with engine_emulation(q, False):
            plain = _layer_out(q, x)
            assert plain.min() < 0  # the layer's own pre-activation output
            with engine_emulation(q, True):  # nested: back on inside, off again after
                assert torch.equal(_layer_out(q, x), exact)
            assert torch.equal(_layer_out(q, x), plain)
        assert torch.equal(_layer_out(q, x), exact)


def test_set_engine_emulation_persists_until_switched_back():
    q, x = _quantized()
    with torch.no_grad():
        exact = _layer_out(q, x)
        set_engine_emulation(q, False)
        assert _layer_out(q, x).min() < 0
        set_engine_emulation(q, False)  # idempotent: the links are not lost
        set_engine_emulation(q, True)
        assert torch.equal(_layer_out(q, x), exact)
