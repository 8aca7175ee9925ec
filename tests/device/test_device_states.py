"""Device placement without a GPU: the ``meta`` device stands in for CUDA.

Most ops run on ``meta`` without data, and under ``StrictDevices`` (conftest) any op mixing a ``meta`` tensor
with a CPU one raises as CUDA + CPU does. So a model prepared, moved or trained on ``meta`` exposes every state
lowbit creates on the CPU behind the model's back: the three failures of issue 15 (capture moments, bias
qparams at export, LSQ scale in QAT) are all of that kind. Each test names the failure it guards. (Steps that
read values, such as calibration or GPTQ's Cholesky, cannot run on ``meta``: ``tests/gpu`` runs them.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import qat
from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.device import move_model, states_off_device
from lowbit.nn import engine_emulation
from lowbit.transforms.prepare import prepare_, quant_layers, quantizers

META = torch.device("meta")
RECIPE = lowbit.Recipe(
    default_weight=QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
    default_input=QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(self.relu(self.conv2(y)) + y), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def test_strict_devices_refuses_what_cuda_refuses(strict_devices):
    """The premise of this file: under the check, the stand-in device refuses CPU operands as CUDA does (plain
    ``meta`` lets the in-place case through), and accepts what CUDA accepts."""
    patches = torch.zeros(2, 3, 4, device=META)
    with strict_devices():
        with pytest.raises(RuntimeError, match=r"tensors on \['cpu', 'meta'\]"):
            buf = torch.zeros(2, 4, 4)
            buf += torch.bmm(patches.transpose(1, 2), patches)
        with pytest.raises(RuntimeError, match=r"tensors on \['cpu', 'meta'\]"):
            torch.where(patches > 0, torch.ones(2, 3, 4), patches)
        out = patches / torch.tensor(2.0) + patches[:, torch.tensor([0, 2])].sum()  # CPU scalar, CPU index: fine
        moved = torch.ones(3).to(META)
    assert out.device == META and moved.device == META


def test_prepare_puts_every_quantizer_on_the_models_device():
    """Quantizer buffers are created on the CPU; prepare_ must move them to a model that lives elsewhere."""
    model = _net().to(META)
    prepared = prepare_(model, RECIPE, torch.zeros(2, 3, 8, 8, device=META))
    assert states_off_device(prepared, META) == []
    assert len(quantizers(prepared)) >= 4


def _converted() -> nn.Module:
    x = torch.randn(16, 3, 8, 8)
    return lowbit.quantize(_net(), x, RECIPE, x[:1], show_progress=False)


def test_bias_qparams_live_with_the_model():
    """Issue 15, nn/onnx_ops.py:67: the int32 bias zero-point was made on the CPU for a CUDA model."""
    q = move_model(_converted(), META)
    grids = [layer.bias_qparams() for _, layer in quant_layers(q)]
    grids = [g for g in grids if g is not None]
    assert grids, "the test model must have quantized biases"
    for scale, zero_point in grids:
        assert scale.device == META and zero_point.device == META and zero_point.dtype == torch.int32


def test_converted_model_runs_on_the_other_device(strict_devices):
    """Every op of the fake-quantized forward pass finds its operands on the model's device."""
    q = move_model(_converted(), META)
    assert states_off_device(q, META) == []
    with engine_emulation(q, False), torch.no_grad(), strict_devices():
        out = q(torch.zeros(4, 3, 8, 8, device=META))
    assert out.device == META and out.shape == (4, 4)


def test_qat_ranges_and_counters_follow_the_model():
    """Issue 15, core/ste.py:40: the learnable scale was created on the CPU for a model already on CUDA."""
    model = _net().to(META)
    prepared = qat.prepare_qat_(model, RECIPE, torch.zeros(2, 3, 8, 8, device=META))
    assert states_off_device(prepared, META) == []
    learn = [m for m in prepared.modules() if getattr(m, "learn_scale", None) is not None]
    assert learn and all(m.learn_scale.device == META for m in learn)


def test_qat_training_step_on_the_other_device(strict_devices):
    """Forward (LSQ fake quantization, simulated BatchNorm), backward and an AdamW step, all on one device."""
    x = torch.randn(32, 3, 8, 8)
    prepared = qat.prepare_qat_(_net(), RECIPE, x[:1], from_ptq=True, calib_data=x)
    prepared = move_model(prepared, META).train()
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3, foreach=False)
    with strict_devices():
        out = prepared(torch.zeros(8, 3, 8, 8, device=META))
        loss = nn.functional.cross_entropy(out, torch.zeros(8, dtype=torch.long, device=META))
        loss.backward()
        opt.step()
    assert all(p.device == META for p in prepared.parameters())
    grads = [m.learn_scale.grad for m in prepared.modules() if getattr(m, "learn_scale", None) is not None]
    assert grads and all(g is not None and g.device == META for g in grads)


def test_qat_steps_are_counted_on_the_host():
    """The step counter is read from a host copy (no GPU wait per forward) and agrees with the buffer."""
    x = torch.randn(32, 3, 8, 8)
    prepared = qat.prepare_qat_(_net(), RECIPE, x[:1], qat.QATConfig(observer_steps=2)).train()
    for _ in range(3):
        prepared(x[:8])
    counted = {n: m for n, m in prepared.named_modules() if hasattr(m, "steps_done") and "qat_steps" in m._buffers}
    assert len(counted) >= 5
    assert all(m.steps_done() == int(m.qat_steps) >= 3 for m in counted.values())  # a quantizer may run twice
    state = copy.deepcopy(prepared.state_dict())
    fresh = qat.prepare_qat_(_net(), RECIPE, x[:1], qat.QATConfig(observer_steps=2))
    fresh.load_state_dict(state)
    for name, m in fresh.named_modules():
        if name in counted:
            assert m.steps_done() == counted[name].steps_done()


def test_capture_moments_live_with_the_layer(strict_devices):
    """Issue 15, ptq/capture.py:245: GPTQ / bias correction failed adding CUDA patches to CPU moments."""
    from lowbit.ptq.capture import InputMoments

    layer = nn.Conv2d(3, 4, 3).to(META)
    with strict_devices():
        moments = InputMoments.empty(layer)
        moments.update(layer, torch.zeros(2, 3, 6, 6, device=META))
    assert moments.hessian.device == META
