"""SmoothQuant: the factors' formula, function preservation, outlier migration, and what it does to INT8 error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.ptq.smoothquant import SmoothQuantConfig, input_channel_amax, linear_groups, smooth_, smoothing_factors


class Block(nn.Module):
    """Post-LN attention-like block: LN output feeds q, k, v AND the residual (so LN cannot absorb 1/s)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1) @ self.v(h)
        return h + self.out(a)


def _outlier_data(n: int = 6, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, d, generator=g)
    x[..., 3] *= 40.0  # one outlier channel, as in transformer hidden states
    return x


def _model() -> Block:
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():
        m.ln.weight.copy_(torch.linspace(0.5, 2.0, 16))
        m.ln.weight[3] = 30.0  # LayerNorm gain makes channel 3 an outlier after the norm
    return m


def test_factors_follow_the_formula():
    a = torch.tensor([4.0, 0.0, 9.0, 1e-12])
    w = torch.tensor([1.0, 2.0, 0.0, 1.0])
    s = smoothing_factors(a, w, 0.5)
    assert s[0].item() == pytest.approx(2.0)  # sqrt(4) / sqrt(1)
    assert s[1].item() == 1.0 and s[2].item() == 1.0  # a zero maximum leaves the channel alone
    assert s[3].item() == pytest.approx(1e-5)  # clamped
    s8 = smoothing_factors(torch.tensor([16.0]), torch.tensor([2.0]), 0.75)
    assert s8.item() == pytest.approx(16.0**0.75 / 2.0**0.25)


def test_smoothing_preserves_the_function_and_shares_one_scale_per_input():
    model, x = _model(), _outlier_data()
    with torch.no_grad():
        ref = model(x)
    gm = smooth_(copy.deepcopy(model), x, SmoothQuantConfig(alpha=0.5))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)
    assert sorted(map(sorted, gm.smoothquant["groups"])) == [["k", "q", "v"], ["out"]]
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.mul]
    assert len(muls) == 2  # one x * (1/s) per smoothed tensor, shared by q, k and v


def test_alpha_one_flattens_the_activation_ranges():
    model, x = _model(), _outlier_data()
    before = input_channel_amax(model, ["q"], x)["q"]
    gm = smooth_(copy.deepcopy(model), x, SmoothQuantConfig(alpha=1.0))
    after = input_channel_amax(gm, ["q"], x)["q"]
    assert before.max() / before.median() > 10
    assert after.max() / after.min() < 1.01  # a_j / s_j = a_j / a_j = 1 for every channel


def test_smoothquant_reduces_static_int8_error_on_outliers():
    model, x = _model(), _outlier_data()
    with torch.no_grad():
        ref = model(x)
    recipe = lowbit.preset("int8").with_calibrator("minmax").keep_float("type:add", "type:matmul")

    def err(m):
        q = lowbit.quantize(m, x, recipe, x[:1], show_progress=False)
        with torch.no_grad():
            return float((q(x) - ref).pow(2).mean())

    assert err(smooth_(copy.deepcopy(model), x, SmoothQuantConfig(alpha=0.5))) < 0.5 * err(copy.deepcopy(model))


def test_skip_rules_bad_alpha_and_untraceable_models():
    model, x = _model(), _outlier_data()
    gm = smooth_(copy.deepcopy(model), x, SmoothQuantConfig(alpha=0.5, skip=("out",)))
    assert gm.smoothquant["groups"] == [["q", "k", "v"]]
    assert list(linear_groups(torch.fx.symbolic_trace(model), ("re:[qkv]",)).values()) == [["out"]]
    with pytest.raises(ValueError, match="alpha must be in"):
        SmoothQuantConfig(alpha=1.5)

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx-traceable"):
        smooth_(Dynamic().eval(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="empty"):
        smooth_(_model(), torch.randn(0, 5, 16))
