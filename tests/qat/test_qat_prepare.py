"""prepare_qat_ / convert_: PTQ-exact start, simulated BatchNorm folding against an independent reference,
BN freezing, gradients, conversion to the PTQ kind of model (exported and run by ONNX Runtime), fallbacks."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import qat
from lowbit.core import PerChannel, PerTensor, QuantSpec, quantize_dequantize
from lowbit.nn import QuantConv2d, QuantLinear, TensorQuantizer
from lowbit.transforms.prepare import quant_layers, quantizers

W4A8 = lowbit.Recipe(
    default_weight=QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
    default_input=QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _prepared(data, **config):
    torch.manual_seed(0)
    return qat.prepare_qat_(ConvBnNet(), W4A8, data[0][:1], qat.QATConfig(**config), from_ptq=True, calib_data=data[0])


def _capture(layer):
    seen = {}
    h1 = layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    h2 = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out.detach()))
    return seen, (h1, h2)


def test_from_ptq_starts_exactly_at_the_ptq_model(digits):
    model, calib, x_eval, _ = digits
    recipe = lowbit.preset("int8")
    ptq = lowbit.quantize(model, calib, recipe, x_eval[:1], show_progress=False)
    q = qat.prepare_qat_(copy.deepcopy(model), recipe, x_eval[:1], from_ptq=True, calib_data=calib)
    assert q.training and all(type(layer).__name__.startswith("QAT") for _, layer in quant_layers(q))
    q.eval()
    with torch.enable_grad():  # both on the float fake-quant path: training starts at the PTQ simulation
        assert torch.equal(q(x_eval), ptq(x_eval))
    qat.convert_(q)
    ptq_qs, qat_qs = dict(quantizers(ptq)), dict(quantizers(q))
    assert ptq_qs.keys() == qat_qs.keys()
    for name, a in ptq_qs.items():
        b = qat_qs[name]
        assert type(b) is TensorQuantizer
        if a.spec is not None:
            assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), name
    with torch.no_grad():  # and converted, the same engine-exact model
        assert torch.equal(q(x_eval), ptq(x_eval))


def test_live_batchnorm_matches_the_fold_then_unfold_reference(data):
    q = _prepared(data, freeze_bn_step=None)
    layer = q.conv
    bn_ref = copy.deepcopy(layer.bn).train()
    seen, hooks = _capture(layer)
    q(data[0])
    for h in hooks:
        h.remove()
    x, k = seen["x"], bn_ref.weight.detach() * torch.rsqrt(bn_ref.running_var + bn_ref.eps)
    wq = layer.weight_quantizer
    w_hat = quantize_dequantize(layer.weight.detach() * k[:, None, None, None], wq.scale[:, None, None, None],
                                wq.zero_point[:, None, None, None], -8, 7)
    z = F.conv2d(x, w_hat, None, 1, 1) / k[None, :, None, None]
    with torch.no_grad():
        y_ref = bn_ref(z)
    torch.testing.assert_close(seen["y"], y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bn.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.bn.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-7)
    assert int(layer.bn.num_batches_tracked) == 1


def test_frozen_batchnorm_is_exactly_the_folded_layer_and_stops_updating(data):
    q = _prepared(data, freeze_bn_step=2)
    q(data[0])
    q(data[0])
    frozen = layer_stats = (q.conv.bn.running_mean.clone(), q.conv.bn.running_var.clone())
    seen, hooks = _capture(q.conv)
    y_train = q(data[0])
    assert torch.equal(q.conv.bn.running_mean, frozen[0]) and torch.equal(q.conv.bn.running_var, layer_stats[1])
    q.eval()
    with torch.enable_grad():
        assert torch.equal(q(data[0]), y_train)  # training after the freeze = the deployed computation
    for h in hooks:
        h.remove()
    folded = copy.deepcopy(q.conv).fold_()  # the real fold, PTQ class
    assert type(folded) is QuantConv2d and "bn" not in folded._modules
    with torch.enable_grad():
        torch.testing.assert_close(folded(seen["x"]), seen["y"], rtol=0, atol=1e-6)


def test_one_step_trains_weights_batchnorm_ranges_and_biases(data):
    q = _prepared(data)
    F.cross_entropy(q(data[0]), data[1]).backward()
    named = dict(q.named_parameters())
    for name in ("conv.weight", "conv.bn.weight", "conv.bn.bias", "fc.weight", "fc.bias",
                 "conv.weight_quantizer.learn_scale", "fc.weight_quantizer.learn_scale"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    act = [n for n in named if n.startswith("lowbit_act") and n.endswith("learn_scale")]
    assert act and all(named[n].grad is not None for n in act)


def test_convert_gives_the_ptq_kind_of_model_that_exports_with_parity(data, tmp_path):
    q = _prepared(data, freeze_bn_step=3)
    opt = torch.optim.AdamW(qat.param_groups(q, 1e-4), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(q(data[0]), data[1]).backward()
        opt.step()
    with pytest.raises(RuntimeError, match="convert_"):
        lowbit.export_onnx(q, data[0][:1], tmp_path / "early.onnx")
    expected = copy.deepcopy(q).eval()
    qat.convert_(q)
    assert not q.training
    assert [type(m) for _, m in quant_layers(q)] == [QuantConv2d, QuantLinear]
    assert all(type(m) is TensorQuantizer for _, m in quantizers(q))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert not [k for k in q.state_dict() if "learn_" in k or "qat_steps" in k or "_extra_state" in k]
    with torch.enable_grad():
        torch.testing.assert_close(q(data[0]), expected(data[0]), rtol=0, atol=1e-5)
    path = lowbit.export_onnx(q, data[0][:1], tmp_path / "qat.onnx", check_parity=False)
    assert lowbit.check_onnx_parity(q, path, data[0]).ok


def test_lowbit_convert_finishes_a_qat_model_like_qat_convert(data):
    """One convert_: lowbit.convert_ on a QAT model does what qat.convert_ does (fold, freeze, link, eval)."""
    q = _prepared(data, freeze_bn_step=3)
    opt = torch.optim.AdamW(qat.param_groups(q, 1e-4), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(q(data[0]), data[1]).backward()
        opt.step()
    a, b = copy.deepcopy(q), q
    a.lowbit_info = b.lowbit_info  # GraphModule.__deepcopy__ drops extra attributes
    assert qat.convert_(a) is a and lowbit.convert_(b) is b
    assert not b.training
    assert [type(m) for _, m in quant_layers(b)] == [QuantConv2d, QuantLinear]
    assert all(type(m) is TensorQuantizer for _, m in quantizers(b))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in b.modules())
    with torch.no_grad():
        assert torch.equal(a(data[0]), b(data[0]))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4 * 9, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(torch.flatten(self.body(x), 1))


def test_untraceable_model_falls_back_to_folding_bn_before_training(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        q = qat.prepare_qat_(Branchy(), W4A8, torch.randn(1, 3, 5, 5), qat.QATConfig(observer_steps=0))
    assert "graph capture failed" in caplog.text
    assert not q.lowbit_info.traced and q.training and q.lowbit_info.folded_bn == ["body.1"]
    assert {type(m).__name__ for _, m in quant_layers(q)} == {"QATConv2d", "QATLinear"}
    y = q(torch.randn(4, 3, 5, 5))  # observer_steps=0: the first step observes, then learns
    y.sum().backward()
    assert q.body[0].weight_quantizer.learn_scale.grad is not None
    qat.convert_(q)
    assert {type(m) for _, m in quant_layers(q)} == {QuantConv2d, QuantLinear}


def test_float_rules_and_per_channel_activations(data):
    recipe = W4A8.keep_float("fc")
    q = qat.prepare_qat_(ConvBnNet(), recipe, data[0][:1])
    assert type(q.fc) is nn.Linear
    per_channel = lowbit.Recipe(W4A8.default_weight, QuantSpec(bits=8, granularity=PerChannel(1), calibrator="minmax"))
    with pytest.raises(ValueError, match="needs example_input"):
        qat.prepare_qat_(ConvBnNet(), per_channel)
    q = qat.prepare_qat_(ConvBnNet(), per_channel, data[0][:1])
    shapes = {n: tuple(p.shape) for n, p in q.named_parameters() if n.startswith("lowbit_act")}
    assert shapes == {"lowbit_act.conv_q.learn_scale": (3,), "lowbit_act.fc_q.learn_scale": (4,)}  # fc's: before flatten


def test_from_ptq_needs_calibration_data():
    with pytest.raises(ValueError, match="calib_data"):
        qat.prepare_qat_(ConvBnNet(), W4A8, from_ptq=True)
