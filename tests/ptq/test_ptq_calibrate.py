"""calibrate: every accepted data form gives the same statistics; empty or unusable data is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core import PerTensor, QuantSpec
from lowbit.nn import QuantState
from lowbit.ptq.calibrate import iter_batches
from lowbit.transforms.recipe import Recipe

RECIPE = Recipe(
    default_weight=QuantSpec(granularity=PerTensor(), calibrator="minmax"),
    default_input=QuantSpec(signed=False, symmetric=False, calibrator="minmax"),
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randn(10, 4) * 3


def _prepared():
    torch.manual_seed(1)
    q = lowbit.prepare_(Tiny().eval(), RECIPE, torch.zeros(1, 4))
    calls = []
    q.fc.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    return q, calls


def _input_quantizer(q):
    (name,) = q.lowbit_info.layer_inputs["fc"]
    return q.get_submodule(name)


def _expected_qparams(x):
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    return scale, round(-lo / scale)


def _forms(x):
    y = torch.arange(len(x))
    return {
        "tensor": (x, [4, 4, 2]),
        "list of tensors": (list(x.split(3)), [3, 3, 3, 1]),
        "(x, y) tuples": ([(xb, yb) for xb, yb in zip(x.split(5), y.split(5))], [5, 5]),
        "[x, y] lists": ([[xb, yb] for xb, yb in zip(x.split(5), y.split(5))], [5, 5]),
        "dicts": ([{"x": xb} for xb in x.split(6)], [6, 4]),
        "generator": ((xb for xb in x.split(7)), [7, 3]),
        "forward_loop": (lambda model: [model(xb) for xb in x.split(2)], [2, 2, 2, 2, 2]),
    }


@pytest.mark.parametrize("form", list(_forms(torch.zeros(10, 4))))
def test_every_data_form_sees_all_samples(data, form):
    batches, expected_calls = _forms(data)[form]
    q, calls = _prepared()
    assert lowbit.calibrate(q, batches, batch_size=4, show_progress=False) is q
    assert calls == expected_calls
    iq = _input_quantizer(q)
    assert iq.state is QuantState.CALIBRATING
    lowbit.convert_(q)
    assert q.fc.effective_input_quantizer() is iq
    scale, zp = _expected_qparams(data)
    assert iq.scale.item() == pytest.approx(scale, rel=1e-6)
    assert iq.zero_point.item() == zp
    w_amax = q.fc.weight.detach().abs().max().item()
    assert q.fc.weight_quantizer.scale.item() == pytest.approx(w_amax / 127, rel=1e-6)


def test_all_forms_agree_exactly(data):
    results = []
    for form, (batches, _) in _forms(data).items():
        q, _ = _prepared()
        lowbit.calibrate(q, batches, batch_size=4, show_progress=False)
        lowbit.convert_(q)
        results.append((form, _input_quantizer(q).scale.clone(), _input_quantizer(q).zero_point.clone()))
    for form, s, z in results[1:]:
        assert torch.equal(s, results[0][1]) and torch.equal(z, results[0][2]), form


def test_calibrate_runs_in_float_and_without_grad(data):
    q, _ = _prepared()
    ref = copy.deepcopy(q.fc).to_float()(data)
    seen = []
    lowbit.calibrate(q, lambda m: seen.append((torch.is_grad_enabled(), m(data))), show_progress=False)
    grad_enabled, out = seen[0]
    assert grad_enabled is False
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("empty", [[], (), iter([]), torch.empty(0, 4)])
def test_empty_data_raises(empty):
    q, _ = _prepared()
    with pytest.raises(ValueError, match="calibration data is empty"):
        lowbit.calibrate(q, empty, show_progress=False)


def test_unusable_batch_type_raises():
    q, _ = _prepared()
    with pytest.raises(TypeError, match="cannot feed a batch of type int"):
        lowbit.calibrate(q, [1, 2], show_progress=False)


def test_recalibration_starts_fresh(data):
    q, _ = _prepared()
    lowbit.calibrate(q, data * 100, show_progress=False)
    lowbit.convert_(q)
    lowbit.calibrate(q, data, show_progress=False)
    lowbit.convert_(q)
    scale, _ = _expected_qparams(data)
    assert _input_quantizer(q).scale.item() == pytest.approx(scale, rel=1e-6)


def test_iter_batches_splits_tensor():
    x = torch.arange(10.0).reshape(10, 1)
    assert [b.shape[0] for b in iter_batches(x, 3)] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(list(iter_batches(x, 3))), x)
