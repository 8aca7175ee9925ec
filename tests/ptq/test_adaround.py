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


def _loss(v, w, s, z, qmin, qmax, h, beta, reg):
    """The AdaRound objective as written in the module docstring (autograd reference)."""
    floor = torch.floor(w / s)
    soft = (torch.clamp(floor + rectified_sigmoid(v) + z, qmin, qmax) - z) * s
    delta = w - soft
    loss = (torch.bmm(delta, h) * delta).sum()
    if beta is not None:
        loss = loss + reg * (1 - torch.abs(2 * rectified_sigmoid(v) - 1) ** beta).sum()
    return loss


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 8, 24), (96, 1, 9), (2, 6, 80)])
def test_written_out_gradient_equals_autograd(beta, shape):
    from lowbit.ptq.adaround import adaround_grad, curvature_product

    torch.manual_seed(1)
    g, r, d = shape
    w = torch.randn(g, r, d, dtype=torch.float64) * 0.1
    x = torch.randn(g, 3 * d, d, dtype=torch.float64)
    h = x.transpose(1, 2) @ x / x.shape[1]
    s = (w.abs().amax(-1, keepdim=True) / 7).expand_as(w).clone()
    z = torch.randint(-2, 3, (g, r, 1)).double().expand_as(w).clone()
    v = (torch.randn(g, r, d, dtype=torch.float64) * 3).requires_grad_(True)  # some h saturate at 0 / 1
    _loss(v, w, s, z, -8, 7, h, beta, 0.01).backward()
    floor = torch.floor(w / s)
    got = adaround_grad(v.detach(), w, s, z, floor + z, -8, 7, lambda dl: torch.bmm(dl, h), beta, 0.01)
    torch.testing.assert_close(got, v.grad, rtol=1e-9, atol=1e-12)


def test_low_rank_curvature_is_exact_when_there_are_fewer_patches_than_inputs():
    from lowbit.ptq.adaround import curvature_factor, curvature_product

    torch.manual_seed(2)
    d, n = 256, 40  # a classifier fed 40 pooled vectors of 256 values: rank 40
    x = torch.randn(1, n, d, dtype=torch.float64)
    h = x.transpose(1, 2) @ x / n
    h = h + 0.05 * torch.diagonal(h, dim1=-2, dim2=-1).mean() * torch.eye(d, dtype=torch.float64)  # the ridge
    f, c = curvature_factor(h)
    assert f.shape == (1, d, n)
    delta = torch.randn(1, 30, d)
    torch.testing.assert_close(curvature_product(h, 30)(delta), torch.bmm(delta, h.float()), rtol=1e-4, atol=1e-4)
    full = torch.randn(1, 2 * d, d, dtype=torch.float64)
    assert curvature_factor(full.transpose(1, 2) @ full) is None  # full rank: the dense product is used


def test_depthwise_product_equals_bmm():
    from lowbit.ptq.adaround import curvature_product

    torch.manual_seed(3)
    h = torch.randn(200, 9, 9)
    h = h @ h.transpose(1, 2)
    delta = torch.randn(200, 1, 9)
    torch.testing.assert_close(curvature_product(h, 1)(delta), torch.bmm(delta, h), rtol=1e-5, atol=1e-5)
