"""LearnableQuantizer: EMA observer phase vs a naive loop, hand-over to LSQ parameters, LSQ / LSQ+ gradients
with LSQ gradient scaling vs torch's learnable fake-quantize kernels, checkpoints, conversion, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.core import PerChannel, PerTensor, QuantSpec, choose_qparams, quantize_dequantize
from lowbit.nn import QuantState, TensorQuantizer
from lowbit.observers import make_observer
from lowbit.qat import LearnableQuantizer, QATConfig, qparam_shape
from lowbit.qat.quantizer import _extrema_as_tensor

UINT4_ASYM = QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerTensor(), calibrator="percentile")
INT4_PER_CHANNEL = QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax")


def _learnable(spec, role="activation", shape=(), **config):
    q = LearnableQuantizer.upgrade_(TensorQuantizer(spec, "q"), role, QATConfig(**config))
    q.init_parameters_(shape)
    return q.train()


def _batches(n, shape=(8, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def test_observer_phase_is_an_ema_of_batch_extrema_then_ranges_become_parameters():
    q = _learnable(UINT4_ASYM, observer_steps=3, ema_momentum=0.25)
    xs = _batches(4)
    lo, hi = float(xs[0].min()), float(xs[0].max())  # naive EMA reference, float64
    for i, x in enumerate(xs[:3]):
        if i:
            lo, hi = lo + 0.25 * (float(x.min()) - lo), hi + 0.25 * (float(x.max()) - hi)
        y = q(x)
        assert q.phase == ("observe" if i < 2 else "learn") and not q.ranges_ready
        s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), 0, 15, False)
        torch.testing.assert_close(q.scale, s, rtol=1e-6, atol=0)
        assert int(q.zero_point) == int(z)
        assert torch.equal(y, quantize_dequantize(x, q.scale, q.zero_point, 0, 15))
        assert q.learn_scale.grad is None
    scale_before = q.scale.clone()
    y = q(xs[3])  # step 3: hand-over, the observer is frozen and the parameters take its qparams
    assert q.ranges_ready and q.phase == "learn" and int(q.qat_steps) == 4
    assert torch.equal(q.learn_scale.detach(), scale_before) and torch.equal(q.scale, scale_before)
    assert float(q.learn_offset.detach()) == float(q.zero_point)
    assert torch.equal(y, quantize_dequantize(xs[3], q.scale, q.zero_point, 0, 15))
    y.sum().backward()
    assert q.learn_scale.grad is not None and q.learn_offset.grad is not None


def test_lsq_gradients_match_torch_learnable_kernel_with_lsq_grad_scaling():
    q = _learnable(UINT4_ASYM, observer_steps=0)
    x = torch.linspace(-3.1, 5.3, 60).reshape(6, 10)
    q(x)  # first step: observes this batch, hands over, learns
    with torch.no_grad():
        q.learn_scale.fill_(0.25)
        q.learn_offset.fill_(4.0)
    xg = x.clone().requires_grad_(True)
    dy = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 16
    (q(xg) * dy).sum().backward()
    g = 1.0 / math.sqrt(60 * 15)
    xr, s, z = x.clone().requires_grad_(True), torch.tensor([0.25], requires_grad=True), torch.tensor([4.0], requires_grad=True)
    yr = torch._fake_quantize_learnable_per_tensor_affine(xr, s, z, 0, 15, g)
    (yr * dy).sum().backward()
    torch.testing.assert_close(q.learn_scale.grad.reshape(1), s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.learn_offset.grad.reshape(1), z.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(xg.grad, xr.grad)


def test_per_channel_weight_gradients_match_torch_and_grad_scaling_can_be_off():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    q = _learnable(INT4_PER_CHANNEL, role="weight", shape=w.shape, observer_steps=0, grad_scaling=False)
    assert q.learn_offset is None and q.learn_scale.shape == (4,)
    q(w)
    torch.testing.assert_close(q.learn_scale.detach(), w.abs().amax(dim=(1, 2, 3)) / 7)
    dy = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    (q(w) * dy).sum().backward()
    s = q.learn_scale.detach().clone().requires_grad_(True)
    yr = torch._fake_quantize_learnable_per_channel_affine(w, s, torch.zeros(4), 0, -8, 7, 1.0)
    (yr * dy).sum().backward()
    torch.testing.assert_close(q.learn_scale.grad, s.grad, rtol=1e-5, atol=1e-6)


def test_weight_observer_follows_the_current_weight_and_mse_init_is_least_squares():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    q = _learnable(INT4_PER_CHANNEL, role="weight", shape=w.shape, observer_steps=2, weight_init="mse")
    q(w)
    q(w * 2)  # no averaging for weights: the range is that of the current weight
    torch.testing.assert_close(q.scale, (w * 2).abs().amax(dim=1) / 7)
    q(w * 2)  # hand-over with weight_init="mse": the clipping of least squared error, never worse than min-max
    err = ((quantize_dequantize(w * 2, q.scale[:, None], q.zero_point[:, None], -8, 7) - w * 2) ** 2).sum(1)
    s_mm = (w * 2).abs().amax(dim=1) / 7
    err_mm = ((quantize_dequantize(w * 2, s_mm[:, None], torch.zeros(3, 1), -8, 7) - w * 2) ** 2).sum(1)
    assert torch.all(err <= err_mm) and torch.any(err < err_mm)


def test_fixed_ranges_after_observer_freeze_without_learning():
    q = _learnable(UINT4_ASYM, observer_steps=2, learn_ranges=False)
    assert q.learn_scale is None
    xs = _batches(4)
    for x in xs[:2]:
        q(x)
    frozen = q.scale.clone()
    for x in xs[2:]:
        q(x * 10)
    assert q.phase == "fixed" and torch.equal(q.scale, frozen)


def test_eval_mode_quantizes_without_observing_or_counting():
    q = _learnable(UINT4_ASYM, observer_steps=5)
    q(_batches(1)[0])
    q.eval()
    state = q.observer.state()
    x = torch.randn(8, 5) * 100
    assert torch.equal(q(x), quantize_dequantize(x, q.scale, q.zero_point, 0, 15))
    assert int(q.qat_steps) == 1 and torch.equal(q.observer.state()["stats"]["min_val"], state["stats"]["min_val"])


def test_state_dict_round_trip_resumes_the_observer_and_the_phase():
    xs = _batches(6, seed=4)
    a = _learnable(UINT4_ASYM, observer_steps=4, ema_momentum=0.5)
    for x in xs[:2]:
        a(x)
    b = _learnable(UINT4_ASYM, observer_steps=4, ema_momentum=0.5)
    b.load_state_dict(a.state_dict())
    assert b.state is QuantState.FROZEN and b.observer.state()["stats"]["batches"] == 2
    for x in xs[2:]:
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.learn_scale, b.learn_scale) and torch.equal(a.learn_offset, b.learn_offset)


def test_per_channel_buffers_take_the_checkpoint_shape():
    w = torch.randn(5, 4)
    a = _learnable(INT4_PER_CHANNEL, role="weight", shape=w.shape, observer_steps=3)
    a(w)
    b = _learnable(INT4_PER_CHANNEL, role="weight", shape=w.shape, observer_steps=3)
    assert b.scale.shape == ()
    b.load_state_dict(a.state_dict())
    assert b.scale.shape == (5,) and torch.equal(b(w), a(w))


def test_to_tensor_quantizer_freezes_rounded_learnt_qparams():
    q = _learnable(UINT4_ASYM, observer_steps=0)
    q(torch.randn(8, 5))
    with torch.no_grad():
        q.learn_scale.fill_(0.1)
        q.learn_offset.fill_(3.6)
    plain = q.to_tensor_quantizer_()
    assert type(plain) is TensorQuantizer and plain.is_active
    assert "learn_scale" not in dict(plain.named_parameters()) and "qat_steps" not in dict(plain.named_buffers())
    assert float(plain.scale) == pytest.approx(0.1) and int(plain.zero_point) == 4


def test_conversion_and_export_refuse_a_quantizer_that_never_saw_data():
    q = _learnable(UINT4_ASYM)
    with pytest.raises(RuntimeError, match="q never saw data"):
        q.to_tensor_quantizer_()
    with pytest.raises(RuntimeError, match="convert_"):
        q.export_tensors()


def test_extrema_tensor_drives_an_observer_like_the_batch_itself():
    for gran, shape in ((PerTensor(), (6, 4)), (PerChannel(1), (3, 4, 5)), (PerChannel(0), (4, 2))):
        xs = _batches(3, shape, seed=5)
        direct, via = (make_observer("ema", granularity=gran, momentum=0.3) for _ in range(2))
        for x in xs:
            direct.update(x)
            rows = x.movedim(gran.axis, 0).reshape(x.shape[gran.axis], -1) if isinstance(gran, PerChannel) else x.reshape(1, -1)
            lo, hi = rows.amin(1), rows.amax(1)
            if isinstance(gran, PerTensor):
                lo, hi = lo[0], hi[0]
            via.update(_extrema_as_tensor(lo, hi, gran, x.ndim))
        assert all(torch.equal(a, b) for a, b in zip(direct.compute_range(QuantSpec(granularity=gran)),
                                                     via.compute_range(QuantSpec(granularity=gran))))


def test_qparam_shapes():
    from lowbit.core import PerGroup

    assert qparam_shape((4, 6), PerTensor()) == ()
    assert qparam_shape((4, 6), PerChannel(1)) == (6,)
    assert qparam_shape((4, 10), PerGroup(4, axis=1)) == (4, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"observer_steps": -1}, "observer_steps"), ({"ema_momentum": 0.0}, "ema_momentum"),
    ({"freeze_bn_step": -2}, "freeze_bn_step"), ({"weight_init": "lsq"}, "weight_init"),
    ({"learn_ranges": 1}, "learn_ranges"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATConfig(**kwargs)


def test_upgrade_refuses_float_quantizers_and_unknown_roles():
    with pytest.raises(TypeError, match="only a TensorQuantizer with a spec"):
        LearnableQuantizer.upgrade_(TensorQuantizer(None, "f"), "activation", QATConfig())
    with pytest.raises(ValueError, match="role"):
        LearnableQuantizer.upgrade_(TensorQuantizer(UINT4_ASYM, "g"), "bias", QATConfig())
