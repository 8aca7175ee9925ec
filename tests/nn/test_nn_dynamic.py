"""Dynamic quantization modules against independent references: naive loops and torch's own dynamic qparams."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.nn.dynamic import (
    QuantDynamicGRU,
    QuantDynamicLinear,
    QuantDynamicLSTM,
    dynamic_from_float,
    dynamic_linear,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")

W8 = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0))
W7 = QuantSpec(bits=7, signed=True, symmetric=True, granularity=PerChannel(0))


def naive_dynamic_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias, per_token: bool):
    """Element by element, in Python floats/ints: the formula of the ONNX spec (DynamicQuantizeLinear + MatMulInteger)."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731 — round to float32
    if per_token:
        factors = [max(max(abs(v) for v in r), 2.0 ** -126) for r in rows]
        rows = [[f32(v / m) for v in r] for r, m in zip(rows, factors)]
    flat = [v for r in rows for v in r]
    lo, hi = min(min(flat), 0.0), max(max(flat), 0.0)
    s = 1.0 if hi == lo else f32((f32(hi - lo)) / 255.0)
    z = min(max(round(-lo / s), 0), 255)
    out = []
    for i, r in enumerate(rows):
        q = [min(max(round(f32(v / s)) + z, 0), 255) - z for v in r]
        y_row = []
        for n in range(w_codes.shape[0]):
            acc = sum(qi * int(w) for qi, w in zip(q, w_codes[n].tolist()))
            y = f32(acc * f32(s * float(w_scale[n])))
            if per_token:
                y = f32(y * factors[i])
            if bias is not None:
                y = f32(y + float(bias[n]))
            y_row.append(y)
        out.append(y_row)
    return torch.tensor(out).reshape(*x.shape[:-1], w_codes.shape[0])


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_linear_matches_naive_loop(per_token, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, generator=g) * torch.rand(7, generator=g) * 5 + 0.3
    w_codes = torch.randint(-64, 64, (5, 7), generator=g)
    w_scale = torch.rand(5, generator=g) * 0.01 + 1e-3
    bias = torch.randn(5, generator=g)
    got = dynamic_linear(x, w_codes, w_scale, bias, per_token)
    want = naive_dynamic_linear(x, w_codes, w_scale, bias, per_token)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_per_tensor_qparams_match_torch_dynamic_quantization():
    """Our run-time quantization of an input equals torch's ``quantize_per_tensor_dynamic`` (quint8, no reduce_range)."""
    x = torch.randn(64, 48) * 3 + 1
    lin = nn.Linear(48, 1, bias=False).eval()
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, 5] = 1.0  # y = x[:, 5] through the integer path
    q = QuantDynamicLinear.from_float(lin, "lin", QuantSpec(bits=8, granularity=PerTensor()))
    tq = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    with torch.no_grad():
        got = q(x)[:, 0]
    w_scale = float(q.weight_quantizers["weight"].scale)
    want = tq.dequantize()[:, 5] * (1.0 / w_scale) * w_scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_linear_is_close_to_float_and_to_torch_ao():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval()
    x = torch.randn(16, 64)
    q = QuantDynamicLinear.from_float(lin, "lin", W8)
    ao = torch.ao.nn.quantized.dynamic.Linear.from_float(_with_qconfig(lin))
    with torch.no_grad():
        ref, ours, theirs = lin(x), q(x), ao(x)
    step = float((ref.max() - ref.min()) / 255)
    assert (ours - ref).abs().max() < 4 * step
    assert (ours - theirs).abs().max() < 4 * step


def _with_qconfig(mod: nn.Module) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig

    mod.qconfig = default_dynamic_qconfig
    return mod


def test_to_float_gives_back_the_same_parameters():
    lin = nn.Linear(8, 4).eval()
    q = QuantDynamicLinear.from_float(lin, "lin", W7)
    back = q.to_float()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    assert not hasattr(back, "weight_quantizers")


def _reference_rnn(mod: nn.Module, x: torch.Tensor, cell) -> torch.Tensor:
    """Step loop written out with dequantized weights and per-step fake-quantized inputs (per tensor)."""
    def dq_linear(v, name, bias):
        wq = q.weight_quantizers[name]
        w = getattr(q, name).detach()
        w_deq = wq.quantize_codes(w).float() * wq.scale.reshape(-1, 1)
        tq = torch.quantize_per_tensor_dynamic(v, torch.quint8, False).dequantize()
        return tq @ w_deq.t() + bias

    q = mod
    h = torch.zeros(x.shape[0], q.hidden_size)
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        h, c = cell(dq_linear(x[:, t], "weight_ih_l0", q.bias_ih_l0), dq_linear(h, "weight_hh_l0", q.bias_hh_l0), h, c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def _lstm_cell(gi, gh, h, c):
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(gi, gh, h, c):
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, c


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_matches_reference_loop_and_stays_close_to_float(kind):
    torch.manual_seed(1)
    float_mod = (nn.LSTM if kind == "lstm" else nn.GRU)(6, 10, batch_first=True).eval()
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        ref_float, _ = float_mod(x)
    q = dynamic_from_float(float_mod, "rnn", W8)
    assert isinstance(q, QuantDynamicLSTM if kind == "lstm" else QuantDynamicGRU)
    with torch.no_grad():
        out, state = q(x)
        want = _reference_rnn(q, x, _lstm_cell if kind == "lstm" else _gru_cell)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-4)
    assert (out - ref_float).abs().max() < 0.05
    last = state[0] if kind == "lstm" else state
    torch.testing.assert_close(last[0], out[:, -1])


def test_two_layer_lstm_returns_pytorch_shapes():
    float_mod = nn.LSTM(4, 8, num_layers=2).eval()  # time-major
    q = dynamic_from_float(float_mod, "lstm", W8)
    x = torch.randn(7, 2, 4)
    with torch.no_grad():
        out, (h, c) = q(x)
        ref, (rh, rc) = float_mod(x)
    assert out.shape == ref.shape and h.shape == rh.shape and c.shape == rc.shape
    assert (out - ref).abs().max() < 0.05


def test_bidirectional_is_refused_with_the_layer_name():
    with pytest.raises(ValueError, match="enc.rnn"):
        dynamic_from_float(nn.GRU(4, 4, bidirectional=True), "enc.rnn", W8)


def test_unsupported_weight_specs_are_refused():
    with pytest.raises(ValueError, match="symmetric"):
        QuantDynamicLinear.from_float(nn.Linear(4, 4), "fc", QuantSpec(symmetric=False, granularity=PerChannel(0)))
    with pytest.raises(TypeError, match="Conv2d"):
        dynamic_from_float(nn.Conv2d(1, 1, 1), "conv", W8)


def test_weight_codes_respect_the_bit_width():
    q = QuantDynamicLinear.from_float(nn.Linear(32, 16), "fc", W7)
    codes, scale = q.weight_codes("weight")
    assert codes.dtype == torch.int8 and int(codes.min()) >= -64 and int(codes.max()) <= 63
    assert scale.shape == (16,) and math.isfinite(float(scale.sum()))


def test_quantized_embedding_matches_per_row_rounding_and_gives_the_float_table_back():
    from lowbit.nn.embedding import QuantEmbedding

    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0).eval()
    q = QuantEmbedding.from_float(emb, "emb", QuantSpec(bits=8, granularity=PerChannel(0)))
    ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
    table = emb.weight.detach()
    scale = table.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    want = (torch.clamp(torch.round(table / scale), -128, 127) * scale)[ids]
    with torch.no_grad():
        torch.testing.assert_close(q(ids), want, rtol=1e-6, atol=1e-7)
    assert q.codes.dtype == torch.int8
    back = q.to_float()
    assert type(back) is nn.Embedding and back.weight is emb.weight and "codes" not in dict(back.named_buffers())
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(4, 2, max_norm=1.0), "e", QuantSpec(granularity=PerChannel(0)))
