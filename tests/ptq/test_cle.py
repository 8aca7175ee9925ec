"""Cross-layer equalization: the float function is unchanged, ranges are equal, ReLU6 clips where it did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.ptq import cle
from lowbit.ptq.capture import ForwardLoop


class _Net(nn.Module):
    def __init__(self, act: type[nn.Module]):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = act()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a2 = act()
        self.pw = nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # channels whose ranges differ by ~100x, as depthwise convs after BN folding do
            self.c1.weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
            self.dw.weight.mul_(torch.logspace(1, -1, 8).reshape(-1, 1, 1, 1))

    def forward(self, x):
        return self.pw(self.a2(self.dw(self.a1(self.c1(x)))))


def _prepared(act, recipe="int8-per-tensor"):
    torch.manual_seed(0)
    net = _Net(act).eval()
    x = torch.randn(16, 3, 10, 10) * 2
    q = lowbit.prepare_(copy.deepcopy(net), lowbit.preset(recipe), x[:1])
    return net, q, x


def _ranges(q):
    r1 = q.c1.weight.detach().reshape(8, -1).abs().amax(1)
    r2 = q.dw.weight.detach().reshape(8, -1).abs().amax(1)
    return r1, r2


def test_pairs_found_through_activation_quantizers_and_pads():
    _, q, _ = _prepared(nn.ReLU)
    pairs = {(p.first, p.second, p.clip) for p in cle.find_pairs(q)}
    assert pairs == {("c1", "dw", None), ("dw", "pw", None)}
    _, q6, _ = _prepared(nn.ReLU6)
    assert {p.clip for p in cle.find_pairs(q6)} == {6.0}


def test_relu_pairs_keep_the_function_and_equalize_ranges():
    net, q, x = _prepared(nn.ReLU)
    cle.apply(q, ForwardLoop(x))
    with torch.no_grad():
        torch.testing.assert_close(q(x), net(x), atol=1e-4, rtol=1e-4)
    r1, r2 = _ranges(q)
    torch.testing.assert_close(r1, r2, rtol=0.05, atol=0)  # chain c1 → dw → pw: iterated to near equality


def test_relu6_channels_stay_exact_on_the_data():
    net, q, x = _prepared(nn.ReLU6)
    before = _ranges(q)
    cle.apply(q, ForwardLoop(x))
    with torch.no_grad():
        torch.testing.assert_close(q(x), net(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(_ranges(q)[0], before[0])  # some channels were scaled
    # channels that reach the clip in the float model are never scaled
    with torch.no_grad():
        pre = net.c1(x).amax(dim=(0, 2, 3))
    clipped = pre >= 6
    assert clipped.any()
    torch.testing.assert_close(_ranges(q)[0][clipped], before[0][clipped])


def test_without_data_relu6_pairs_are_left_alone():
    _, q, x = _prepared(nn.ReLU6)
    w = q.c1.weight.detach().clone()
    cle.apply(q, None)
    torch.testing.assert_close(q.c1.weight, w)


def test_cle_helps_per_tensor_weights():
    net, q, x = _prepared(nn.ReLU)
    with torch.no_grad():
        ref = net(x)
    errors = {}
    for name, passes in (("rtn", ()), ("cle", ("cle",))):
        recipe = lowbit.preset("int8-per-tensor").with_passes(*passes)
        qm = lowbit.quantize(net, x, recipe, x[:1], show_progress=False)
        with torch.no_grad():
            errors[name] = float((qm(x) - ref).pow(2).mean())
    assert errors["cle"] < 0.5 * errors["rtn"]


@pytest.mark.parametrize("s_first", [True, False])
def test_pair_scales_formula(s_first):
    a, b = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([1.0, 4.0, 9.0]).reshape(3, 1, 1, 1).expand(3, 2, 1, 1))
        b.weight.copy_(torch.tensor([4.0, 1.0, 1.0]).reshape(1, 3, 1, 1).expand(2, 3, 1, 1))
    s = cle.pair_scales(a, b, None, None)
    torch.testing.assert_close(s, torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64))
    clip = cle.pair_scales(a, b, 6.0, torch.tensor([7.0, 3.0, 30.0]) if s_first else None)
    expected = torch.tensor([1.0, 2.0, 1.0]) if s_first else torch.ones(3)
    torch.testing.assert_close(clip, expected.double())
