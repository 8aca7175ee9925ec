"""Graph rewrites for integer engines compute the same function as the graph they replace (naive references)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import Requantize, TensorQuantizer
from lowbit.transforms.capture import export_capture
from lowbit.transforms.engine_ops import (decompose_attention, decompose_gated, explicit_same_padding,
                                          global_pools_for_whole_map_windows)


class Attention(nn.Module):
    def __init__(self, causal: bool, mask: str | None):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.causal, self.mask = causal, mask

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        mask = None
        if self.mask == "bool":
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        elif self.mask == "float":
            mask = torch.linspace(-3, 0, x.shape[1] * x.shape[1]).view(x.shape[1], x.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)


def _naive_attention(q, k, v, mask, causal):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bool"), (False, "float")])
def test_attention_decomposition_is_the_same_function(causal, mask):
    torch.manual_seed(0)
    model = Attention(causal, mask).eval()
    x = torch.randn(3, 5, 16)
    gm = export_capture(model, x).graph_module
    assert decompose_attention(gm) == 1
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 2  # q kᵀ and p v: two MatMul sites
    with torch.no_grad():
        q, k, v = model.qkv(x).view(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        m = None if mask is None else (torch.ones(5, 5, dtype=torch.bool).tril() if mask == "bool"
                                       else torch.linspace(-3, 0, 25).view(5, 5))
        torch.testing.assert_close(gm(x), _naive_attention(q, k, v, m, causal), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act,gate", [(nn.SiLU, torch.sigmoid), (nn.Hardswish, F.hardsigmoid)])
def test_gated_activations_become_gate_times_x(act, gate):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act(), nn.Conv2d(4, 4, 1)).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8) * 3
    ref = gm(x)
    assert decompose_gated(gm) == 1
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), act) for n in gm.graph.nodes)
    assert sum(n.target is gate for n in gm.graph.nodes) == 1 and sum(n.target is torch.mul for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(x), ref, rtol=2e-6, atol=1e-6)  # same function, last-ulp rounding


def test_same_padding_made_explicit_and_whole_map_pool_made_global():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 5, padding="same", dilation=2)
            self.pool = nn.AvgPool2d(64, ceil_mode=True)  # a window far larger than the 8x8 map

        def forward(self, x):
            return self.pool(self.conv(x))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    gm = export_capture(copy.deepcopy(model), x).graph_module
    assert explicit_same_padding(gm) == 1 and gm.get_submodule("conv").padding == (4, 4)
    assert global_pools_for_whole_map_windows(gm) == 1
    assert isinstance(gm.get_submodule("pool"), nn.AdaptiveAvgPool2d)
    gm.recompile()
    torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-6)


def test_requantize_reapplies_without_observing_or_hooks():
    spec = lowbit.preset("int8").default_input
    q = TensorQuantizer(spec, "t")
    again = Requantize(q)
    q.start_calibration()
    x = torch.randn(64) * 3
    q(x)
    before = q.observer.state_dict() if hasattr(q.observer, "state_dict") else None
    assert torch.equal(again(x), x)  # calibrating: passes through, observes nothing
    if before is not None:
        after = q.observer.state_dict()
        assert all(torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before)
    q.freeze()
    calls = []
    q.register_forward_hook(lambda *a: calls.append(1))
    once = q(x)
    assert torch.equal(again(once), once) and len(calls) == 1  # Q(DQ(Q(x))) = Q(x); the hook saw one call


def test_gpt2_style_addmm_is_lifted_to_a_linear():
    class Conv1D(nn.Module):  # transformers' GPT-2 projection: x @ W + b with W [in, out]
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 10))
            self.bias = nn.Parameter(torch.randn(10))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, 6), self.weight).view(*x.shape[:-1], 10)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D()

        def forward(self, x):
            return self.proj(x)

    model = Net().eval()
    x = torch.randn(2, 4, 6)
    gm = export_capture(model, x).graph_module
    assert isinstance(gm.get_submodule("proj"), nn.Linear)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    q = lowbit.prepare_(copy.deepcopy(model), lowbit.preset("int8"), x)
    assert q.lowbit_info.layer_kinds.get("proj") == "Linear"
