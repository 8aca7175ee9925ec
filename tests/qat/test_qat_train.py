"""The training helpers: the three-phase schedule against its closed form, distillation losses against torch,
batch sharding, AdamW groups, exact resume from a checkpoint (mid observer phase, before the BN freeze),
and label-free training by distillation."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import qat
from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.qat.train import epoch_batches

RECIPE = lowbit.Recipe(
    default_weight=QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
    default_input=QuantSpec(bits=6, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 4, 4, generator=g)
    return x, (x.mean(dim=(1, 2, 3)) * 3).round().clamp(-1, 1).long() + 1


def _fresh(config: qat.QATConfig) -> nn.Module:
    torch.manual_seed(0)
    return qat.prepare_qat_(Net(), RECIPE, torch.zeros(1, 2, 4, 4), config)


def test_three_phase_schedule_follows_its_closed_form():
    s = qat.ThreePhaseSchedule(100, low_factor=0.01, peak_factor=1 / 3, final_factor=0.0)
    assert s(0) == s(29) == 0.01
    assert s(30) == pytest.approx(0.01) and s(50) == pytest.approx(0.01 + (1 / 3 - 0.01) / 2)
    assert s(70) == pytest.approx(1 / 3) and s(85) == pytest.approx(1 / 6) and s(100) == pytest.approx(0.0)
    rise = [s(t) for t in range(30, 71)]
    decay = [s(t) for t in range(70, 101)]
    assert rise == sorted(rise) and decay == sorted(decay, reverse=True)
    assert s(77) == pytest.approx((1 / 3) * 0.5 * (1 + math.cos(math.pi * 7 / 30)))
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = s.scheduler(opt)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([3e-3 * s(t) for t in range(100)])
    with pytest.raises(ValueError, match="warm_end"):
        qat.ThreePhaseSchedule(10, warm_end=0.8, rise_end=0.5)


def test_distillation_losses_match_torch():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g, requires_grad=True), torch.randn(5, 7, generator=g, requires_grad=True)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    loss = qat.kl_distill_loss(s, t, temperature=2.0)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert t.grad is None and s.grad is not None  # the teacher is not trained
    torch.testing.assert_close(qat.mse_distill_loss(s, t), ((s - t) ** 2).mean())
    with pytest.raises(ValueError, match="temperature"):
        qat.kl_distill_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        qat.distill_loss("cosine")


def test_epoch_batches_split_each_global_batch_across_ranks():
    single = epoch_batches(21, 8, seed=3, epoch=1)
    assert [len(b) for b in single] == [8, 8, 5] and sorted(torch.cat(single).tolist()) == list(range(21))
    parts = [epoch_batches(21, 8, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    for step, whole in enumerate(single):
        assert torch.equal(torch.cat([parts[0][step], parts[1][step]]), whole)
    assert not torch.equal(torch.cat(epoch_batches(21, 8, 3, 2)), torch.cat(single))  # reshuffled every epoch
    assert len(epoch_batches(17, 8, 0, 0, rank=0, world=2)) == 2  # a last batch of 1 < 2 ranks is dropped


def test_param_groups_exempt_ranges_norms_and_biases_from_decay():
    model = _fresh(qat.QATConfig())
    decay, no_decay = qat.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "fc.weight"]
    assert {"conv.bn.weight", "fc.bias", "conv.weight_quantizer.learn_scale"} <= {names[id(p)] for p in no_decay["params"]}


def test_checkpoint_resumes_exactly_mid_observer_phase_and_before_bn_freeze(data, tmp_path):
    config = qat.QATConfig(observer_steps=10, freeze_bn_step=12)  # 4 steps per epoch: both happen in epoch 3
    train = qat.TrainConfig(epochs=4, batch_size=8, lr=1e-2)
    straight = _fresh(config)
    qat.train_qat(straight, *data, config=train)

    first = _fresh(config)
    path = tmp_path / "ckpt.pt"
    half = qat.TrainConfig(epochs=2, batch_size=8, lr=1e-2)
    state = qat.make_train_state(first, train, steps_per_epoch=4)
    qat.train_qat(first, *data, config=half, state=state)
    qat.save_checkpoint(path, first, state, note="half-way")
    assert first.lowbit_act.conv_q.phase == "observe"

    resumed = _fresh(config)
    state = qat.make_train_state(resumed, train, steps_per_epoch=4)
    assert qat.load_checkpoint(path, resumed, state) == {"note": "half-way"}
    assert state.epochs_done == 2 and len(state.log) == 2
    qat.train_qat(resumed, *data, config=train, state=state)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("_extra_state"):
            assert a[key]["observer"] is not None and _same(a[key], b[key]), key
        else:
            assert torch.equal(a[key], b[key]), key
    assert straight.lowbit_act.conv_q.ranges_ready and resumed.conv.bn_frozen()


def _same(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return x == y


def test_label_free_training_distills_the_float_model(data):
    torch.manual_seed(0)
    teacher = Net().eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(20)  # confident logits: a 2-bit copy disagrees with them at first
    recipe = lowbit.Recipe(replace(RECIPE.default_weight, bits=2), replace(RECIPE.default_input, bits=3))
    model = qat.prepare_qat_(copy.deepcopy(teacher), recipe, data[0][:1], qat.QATConfig(freeze_bn_step=0),
                             from_ptq=True, calib_data=data[0])

    def kl_to_teacher(m):
        with torch.no_grad():
            return float(qat.kl_distill_loss(m(data[0]), teacher(data[0])))

    model.eval()
    before = kl_to_teacher(model)
    state = qat.train_qat(model, data[0], teacher=teacher, config=qat.TrainConfig(
        epochs=6, batch_size=8, lr=1e-2, distill="kl", schedule="constant"), evaluate=kl_to_teacher)
    assert [e.epoch for e in state.log] == list(range(1, 7)) and all(e.metric is not None for e in state.log)
    assert state.log[-1].metric < 0.7 * before


def test_train_qat_refuses_missing_targets(data):
    model = _fresh(qat.QATConfig())
    with pytest.raises(ValueError, match="without labels needs distillation"):
        qat.train_qat(model, data[0])
    with pytest.raises(ValueError, match="needs the FP32 teacher"):
        qat.train_qat(model, data[0], config=qat.TrainConfig(distill="kl"))
    with pytest.raises(ValueError, match="schedule"):
        qat.TrainConfig(schedule="step")
