"""GPTQ against a naive Optimal-Brain-Quantization loop, and its error against round-to-nearest."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.ptq.gptq import _damped, gptq_quantize_weight
from lowbit.ptq.weight_range import output_error, quantize_columns
from .refs import naive_obq


def _problem(seed: int, g: int, r: int, d: int, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, r, d, generator=gen, dtype=torch.float64)
    x = torch.randn(g, 3 * d, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    h = x.transpose(1, 2) @ x
    qmax = 2 ** (bits - 1) - 1
    s = (w.abs().amax(-1, keepdim=True) / qmax).expand_as(w).clone()
    return w, h, s, torch.zeros_like(w), -qmax - 1, qmax


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), g=st.integers(1, 3), r=st.integers(1, 6), d=st.integers(1, 20),
       block=st.sampled_from([1, 3, 128]), act_order=st.booleans(), bits=st.sampled_from([2, 4, 8]))
def test_gptq_equals_naive_obq(seed, g, r, d, block, act_order, bits):
    w, h, s, z, qmin, qmax = _problem(seed, g, r, d, bits)
    q = gptq_quantize_weight(w, h, s, z, qmin, qmax, damp=0.01, block_size=block, act_order=act_order)
    hd, _ = _damped(h, 0.01)
    for i in range(g):
        order = torch.argsort(torch.diagonal(h[i]), descending=True).tolist() if act_order else list(range(d))
        ref = naive_obq(w[i], hd[i], s[i], z[i], qmin, qmax, order)
        torch.testing.assert_close(q[i], ref, atol=1e-9, rtol=0)


def test_gptq_is_on_grid_and_beats_round_to_nearest():
    w, h, s, z, qmin, qmax = _problem(0, 2, 16, 48, bits=3)
    q = gptq_quantize_weight(w, h, s, z, qmin, qmax)
    codes = q / s
    torch.testing.assert_close(codes, torch.round(codes), atol=1e-9, rtol=0)
    assert codes.min() >= qmin and codes.max() <= qmax
    rtn = output_error(w, quantize_columns(w, s, z, qmin, qmax), h)
    assert output_error(w, q, h) < 0.8 * rtn


def test_dead_inputs_get_zero_weight():
    w, h, s, z, qmin, qmax = _problem(1, 1, 4, 6)
    h[:, 2, :] = 0
    h[:, :, 2] = 0
    q = gptq_quantize_weight(w, h, s, z, qmin, qmax)
    assert torch.all(q[..., 2] == 0)
