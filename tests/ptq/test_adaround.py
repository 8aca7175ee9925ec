"""AdaRound: its pieces against their formulas, and the learned rounding against round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ptq.adaround import GAMMA, ZETA, AdaRoundConfig, adaround_weight, beta_at, init_v, rectified_sigmoid
from lowbit.ptq.weight_range import output_error, quantize_columns


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 1.0))
def test_init_v_starts_at_the_float_weight(rest):
    h = rectified_sigmoid(init_v(torch.tensor([rest], dtype=torch.float64)))
    assert abs(float(h) - rest) < 2e-4  # σ is clamped to [1e-4, 1 - 1e-4] before the logit


def test_rectified_sigmoid_formula():
    v = torch.linspace(-8, 8, 33)
    expected = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.testing.assert_close(rectified_sigmoid(v), expected)
    assert rectified_sigmoid(torch.tensor(-20.0)) == 0 and rectified_sigmoid(torch.tensor(20.0)) == 1


def test_beta_schedule():
    cfg = AdaRoundConfig(iterations=100, warmup=0.2, beta=(20.0, 2.0))
    assert beta_at(0, cfg) is None and beta_at(19, cfg) is None
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(99, cfg) == pytest.approx(2.0 + 18.0 / 80)


@pytest.mark.parametrize("bad", [dict(iterations=0), dict(warmup=1.0), dict(lr=0.0), dict(reg_weight=-1.0)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError, match="AdaRoundConfig"):
        AdaRoundConfig(**bad)


def test_learned_rounding_rounds_up_or_down_and_beats_nearest():
    torch.manual_seed(0)
    g, r, d = 1, 8, 24
    w = torch.randn(g, r, d) * 0.1
    x = torch.randn(g, 2000, d) @ (torch.eye(d) + 0.5 * torch.randn(d, d))
    h = x.transpose(1, 2) @ x / x.shape[1]
    s = (w.abs().amax(-1, keepdim=True) / 7).expand_as(w).clone()
    z = torch.zeros_like(w)
    q = adaround_weight(w, h, s, z, -8, 7, AdaRoundConfig(iterations=300))
    codes = torch.round(q / s)
    torch.testing.assert_close(q, codes * s)  # on the grid
    floor = torch.floor(w / s)
    assert torch.all((codes == floor) | (codes == floor + 1))  # only up or down, never further
    rtn = output_error(w, quantize_columns(w, s, z, -8, 7), h)
    assert output_error(w, q, h) < 0.8 * rtn
