"""TensorQuantizer: its state machine and its frozen forward pass."""

from __future__ import annotations

import pytest
import torch

from lowbit.core import PerChannel, PerTensor, QuantSpec, quantize_dequantize
from lowbit.nn import QuantState, TensorQuantizer, unsigned_variant


def test_freeze_before_calibrate_is_refused():
    q = TensorQuantizer(QuantSpec(), "blk.q")
    with pytest.raises(RuntimeError, match=r"blk\.q cannot freeze from state initial"):
        q.freeze()
    assert q.state is QuantState.INITIAL


def test_observe_outside_calibration_is_refused():
    q = TensorQuantizer(QuantSpec(), "blk.q")
    with pytest.raises(RuntimeError, match="not calibrating"):
        q.observe(torch.ones(3))


def test_calibrate_after_freeze_is_refused_until_reset():
    q = TensorQuantizer(QuantSpec(), "blk.q")
    q.start_calibration()
    q(torch.linspace(-1, 1, 11))
    q.freeze()
    with pytest.raises(RuntimeError, match=r"blk\.q is frozen; call reset\(\)"):
        q.start_calibration()
    assert q.state is QuantState.FROZEN
    q.reset()
    assert q.state is QuantState.INITIAL and q.observer is None
    q.start_calibration()
    assert q.state is QuantState.CALIBRATING


def test_freeze_without_data_says_saw_no_data():
    q = TensorQuantizer(QuantSpec(), "blk.q")
    q.start_calibration()
    with pytest.raises(RuntimeError, match="'blk.q' saw no data"):
        q.freeze()
    assert q.state is QuantState.CALIBRATING


def test_float_quantizer_is_a_permanent_pass_through():
    q = TensorQuantizer(None, "f")
    q.start_calibration()
    q.freeze()
    x = torch.randn(5)
    assert q.state is QuantState.INITIAL and not q.is_active
    assert q(x) is x
    with pytest.raises(RuntimeError, match="keeps its tensor in float"):
        q.set_qparams(torch.ones(()), torch.zeros(()))


def test_initial_and_calibrating_pass_tensor_through_untouched():
    q = TensorQuantizer(QuantSpec(), "q")
    x = torch.randn(4, 4)
    assert torch.equal(q(x), x)
    q.start_calibration()
    assert torch.equal(q(x), x)


def test_frozen_per_tensor_forward_equals_quantize_dequantize():
    spec = QuantSpec(bits=8, signed=False, symmetric=False, calibrator="minmax")
    q = TensorQuantizer(spec, "q")
    q.start_calibration()
    calib = torch.tensor([-0.5, 0.0, 1.2, 3.0])
    q(calib)
    q.freeze()
    # independent qparams: s = (max - min) / 255, z = -round(min / s)
    s = (3.0 - (-0.5)) / 255
    assert q.scale.item() == pytest.approx(s, rel=1e-6)
    assert q.zero_point.item() == round(0.5 / s)
    x = torch.randn(2, 3, 5, 5) * 2
    ref = quantize_dequantize(x, q.scale, q.zero_point, 0, 255)
    assert torch.equal(q(x), ref)
    # and by hand
    hand = (torch.clamp(torch.round(x / q.scale) + q.zero_point, 0, 255) - q.zero_point) * q.scale
    torch.testing.assert_close(q(x), hand, rtol=0, atol=1e-7)


def test_frozen_per_channel_forward_equals_quantize_dequantize():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0))
    q = TensorQuantizer(spec, "w")
    w = torch.randn(6, 3, 3, 3)
    q.start_calibration()
    q.observe(w)
    q.freeze()
    amax = w.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(q.scale, amax / 127, rtol=1e-6, atol=0)
    assert torch.equal(q.zero_point, torch.zeros(6, dtype=torch.int64))
    s = q.scale.reshape(-1, 1, 1, 1)
    assert torch.equal(q(w), quantize_dequantize(w, s, torch.zeros_like(s, dtype=torch.int64), -128, 127))
    assert torch.equal(q.quantize_codes(w), torch.clamp(torch.round(w / s), -128, 127).long())
    assert q.quantize_codes(w).abs().amax(dim=(1, 2, 3)).eq(127).all()


def test_disabled_quantizer_keeps_qparams():
    q = TensorQuantizer(QuantSpec(), "q")
    q.start_calibration()
    q(torch.tensor([-2.0, 2.0]))
    q.freeze()
    scale = q.scale.clone()
    x = torch.tensor([0.123456])
    q.enabled = False
    assert torch.equal(q(x), x) and not q.is_active
    q.enabled = True
    assert torch.equal(q.scale, scale) and q.is_active
    assert not torch.equal(q(x), x)


def test_bounds_clip_the_calibrated_range():
    q = TensorQuantizer(unsigned_variant(QuantSpec(calibrator="minmax")), "relu6", bounds=(0.0, 6.0))
    q.start_calibration()
    q(torch.tensor([0.0, 2.0, 9.0]))  # a value beyond the producer's known bound
    q.freeze()
    assert q.scale.item() == pytest.approx(6.0 / 255, rel=1e-6)
    assert q.zero_point.item() == 0
    assert q.spec.signed is False and q.spec.symmetric is True


def test_per_tensor_export_tensors_are_scalars():
    q = TensorQuantizer(QuantSpec(signed=False, symmetric=False), "q")
    q.start_calibration()
    q(torch.tensor([-1.0, 3.0]))
    q.freeze()
    t = q.export_tensors()
    assert t["scale"].shape == () and t["zp"].dtype == torch.uint8
    assert q.onnx_axis(4) is None
    pc = TensorQuantizer(QuantSpec(granularity=PerChannel(-1)), "pc")
    assert pc.onnx_axis(3) == 2
    assert isinstance(QuantSpec().granularity, PerTensor)
