"""Quantized Conv / Linear twins: parameter sharing, float round trip, bias grid, bias range fitting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.nn import (
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    TensorQuantizer,
    from_float,
)
from lowbit.nn.modules import BIAS_CODE_LIMIT

W8 = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax")
A8 = QuantSpec(bits=8, signed=False, symmetric=False, calibrator="minmax")

CASES = [
    (lambda: nn.Conv2d(3, 5, 3, padding=1), QuantConv2d, (2, 3, 6, 6), W8),
    (lambda: nn.Conv1d(3, 5, 3, stride=2), QuantConv1d, (2, 3, 9), W8),
    (lambda: nn.Linear(7, 4), QuantLinear, (3, 7), W8),
    (lambda: nn.ConvTranspose2d(3, 5, 2, stride=2), QuantConvTranspose2d, (2, 3, 4, 4),
     QuantSpec(granularity=PerChannel(1))),
]


def _calibrate(layer, x):
    for q in (layer.input_quantizer, layer.weight_quantizer):
        q.start_calibration()
    layer.weight_quantizer.observe(layer.weight)
    with torch.no_grad():
        layer(x)
    layer.input_quantizer.freeze()
    layer.weight_quantizer.freeze()


@pytest.mark.parametrize(("make", "qcls", "shape", "wspec"), CASES)
def test_from_float_shares_parameters_and_to_float_round_trips(make, qcls, shape, wspec):
    f = make().eval()
    x = torch.randn(shape)
    ref = f(x)
    q = from_float(f, "layer", wspec, A8)
    assert type(q) is qcls and isinstance(q, type(f))
    assert q.weight is f.weight and q.bias is f.bias
    assert q.state_dict().keys() >= f.state_dict().keys()
    assert q.layer_name == "layer" and q.input_quantizer.qname == "layer.input_quantizer"
    # not yet calibrated: identical float output
    assert torch.equal(q(x), ref)
    back = q.to_float()
    assert type(back) is type(f)
    assert back.weight is f.weight and back.bias is f.bias
    assert not hasattr(back, "input_quantizer") and "weight_quantizer" not in back._modules
    assert list(back.state_dict()) == list(f.state_dict())
    assert torch.equal(back(x), ref)
    # after calibration the quantized layer differs, its float twin does not
    _calibrate(q, x)
    assert not torch.equal(q(x), ref)
    assert torch.equal(q.to_float()(x), ref)


def test_from_float_rejects_unknown_layer():
    with pytest.raises(TypeError, match="layer act: no quantized version of ReLU"):
        from_float(nn.ReLU(), "act", W8, A8)


@pytest.mark.parametrize(("make", "qcls", "shape", "wspec"), CASES)
def test_bias_is_rounded_to_int32_grid(make, qcls, shape, wspec):
    torch.manual_seed(1)
    f = make().eval()
    with torch.no_grad():
        f.bias.mul_(3.7)
    q = from_float(f, "layer", wspec, A8)
    x = torch.randn(shape)
    _calibrate(q, x)
    s_in = q.input_quantizer.scale
    axis = 1 if qcls is QuantConvTranspose2d else 0
    dims = tuple(d for d in range(f.weight.ndim) if d != axis)
    s_w = f.weight.detach().abs().amax(dim=dims) / 127
    torch.testing.assert_close(q.weight_quantizer.scale, s_w, rtol=1e-6, atol=0)
    s_b = s_in * q.weight_quantizer.scale
    grid, zp = q.bias_qparams()
    torch.testing.assert_close(grid, s_b, rtol=0, atol=0)
    assert torch.equal(zp, torch.zeros(f.bias.numel(), dtype=torch.int32))
    expected_bias = torch.round(f.bias / s_b) * s_b
    assert torch.equal(q.quantized_bias(), expected_bias)
    assert not torch.equal(q.quantized_bias(), f.bias)
    codes = q.export_tensors()["b_codes"]
    assert codes.dtype == torch.int32 and torch.equal(codes, torch.round(f.bias / s_b).to(torch.int32))
    # the whole forward pass equals an independent fake-quant reference
    with torch.no_grad():
        z = q.input_quantizer.zero_point
        xq = (torch.clamp(torch.round(x / s_in) + z, 0, 255) - z) * s_in
        view = [1] * f.weight.ndim
        view[axis] = -1
        sw = q.weight_quantizer.scale.reshape(view)
        wq = torch.clamp(torch.round(f.weight / sw), -128, 127) * sw
        if qcls is QuantConv2d:
            ref = F.conv2d(xq, wq, expected_bias, padding=1)
        elif qcls is QuantConv1d:
            ref = F.conv1d(xq, wq, expected_bias, stride=2)
        elif qcls is QuantLinear:
            ref = F.linear(xq, wq, expected_bias)
        else:
            ref = F.conv_transpose2d(xq, wq, expected_bias, stride=2)
        torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)


def test_per_tensor_weight_bias_grid_is_expanded_per_channel():
    f = nn.Conv2d(2, 4, 1)
    q = from_float(f, "c", QuantSpec(granularity=PerTensor()), A8)
    _calibrate(q, torch.randn(1, 2, 3, 3))
    grid, _ = q.bias_qparams()
    assert grid.shape == (4,)
    assert torch.equal(grid, (q.input_quantizer.scale * q.weight_quantizer.scale).expand(4))


def test_no_bias_grid_without_active_input_quantizer():
    q = from_float(nn.Conv2d(2, 4, 1), "c", W8, None)
    q.weight_quantizer.start_calibration()
    q.weight_quantizer.observe(q.weight)
    q.weight_quantizer.freeze()
    assert q.bias_qparams() is None
    assert q.quantized_bias() is q.bias
    assert q.fit_bias_range_() == 0


def _dead_channel_conv(wspec):
    f = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        f.weight.copy_(torch.randn(3, 2, 1, 1))
        f.weight[1].fill_(1e-12)  # a channel killed by BatchNorm folding
        f.bias.copy_(torch.tensor([0.5, 50.0, -0.25]))
    q = from_float(f, "dead", wspec, A8)
    q.input_quantizer.set_qparams(torch.tensor(0.01), torch.tensor(0))
    q.weight_quantizer.start_calibration()
    q.weight_quantizer.observe(q.weight)
    q.weight_quantizer.freeze()
    return f, q


def test_fit_bias_range_raises_the_dead_channel_scale_per_channel():
    f, q = _dead_channel_conv(W8)
    before = q.weight_quantizer.scale.clone()
    # without the fix the bias code of channel 1 is far beyond int32
    assert (f.bias[1] / (0.01 * before[1])).abs() > 2**31
    assert q.fit_bias_range_() == 1
    after = q.weight_quantizer.scale
    need = 50.0 / (0.01 * BIAS_CODE_LIMIT)
    assert after[1].item() == pytest.approx(need, rel=1e-6)
    assert after[0] == before[0] and after[2] == before[2]
    codes = q.export_tensors()["b_codes"].long()
    assert codes.abs().max() <= BIAS_CODE_LIMIT
    assert codes[1].item() == pytest.approx(BIAS_CODE_LIMIT, rel=1e-5)
    s_b = q.bias_qparams()[0]
    assert ((q.quantized_bias() - f.bias).abs() <= s_b / 2 * (1 + 1e-6)).all()  # rounding, never wrap-around
    assert q.fit_bias_range_() == 0  # idempotent


def test_fit_bias_range_per_tensor_raises_the_single_scale():
    f, q = _dead_channel_conv(QuantSpec(granularity=PerTensor()))
    before = q.weight_quantizer.scale.clone()
    need = 50.0 / (0.01 * BIAS_CODE_LIMIT)
    if before.item() >= need:  # the live channels already give a large enough scale
        assert q.fit_bias_range_() == 0
        return
    assert q.fit_bias_range_() == 1
    assert q.weight_quantizer.scale.shape == ()
    assert q.weight_quantizer.scale.item() == pytest.approx(need, rel=1e-6)


def test_fit_bias_range_forces_fit_with_tiny_input_scale():
    f, q = _dead_channel_conv(QuantSpec(granularity=PerTensor()))
    q.input_quantizer.set_qparams(torch.tensor(1e-7), torch.tensor(0))
    need = 50.0 / (1e-7 * BIAS_CODE_LIMIT)
    assert q.weight_quantizer.scale.item() < need
    assert q.fit_bias_range_() == 1
    assert q.weight_quantizer.scale.item() == pytest.approx(need, rel=1e-6)
    assert q.export_tensors()["b_codes"].long().abs().max() <= BIAS_CODE_LIMIT


def test_upstream_input_quantizer_drives_bias_grid():
    f = nn.Linear(4, 2)
    q = from_float(f, "fc", W8, None)
    shared = TensorQuantizer(A8, "shared")
    shared.set_qparams(torch.tensor(0.02), torch.tensor(3))
    q.set_upstream_input_quantizer(shared)
    q.weight_quantizer.start_calibration()
    q.weight_quantizer.observe(q.weight)
    q.weight_quantizer.freeze()
    assert q.effective_input_quantizer() is shared
    assert "shared" not in dict(q.named_modules())  # owned by the graph, not the layer
    torch.testing.assert_close(q.bias_qparams()[0], 0.02 * q.weight_quantizer.scale, rtol=0, atol=0)
