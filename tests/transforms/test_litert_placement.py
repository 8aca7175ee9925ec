"""Recipe target ``litert``: preset, validation, placement (shared pool qparams, logits min-max), pad folding."""

from __future__ import annotations

import pytest
import yaml
import torch
import torch.fx as fx
from torch import nn

import lowbit
from lowbit.core import PerTensor
from lowbit.export.litert import fold_zero_pads
from lowbit.nn import Requantize, TensorQuantizer
from lowbit.transforms.recipe import recipe_from_dict


def test_preset_is_int8_symmetric_weights_asymmetric_activations():
    r = lowbit.preset("litert-int8")
    assert r.target == "litert"
    w, a = r.default_weight, r.default_input
    assert (w.bits, w.signed, w.symmetric, w.narrow_range) == (8, True, True, True)
    assert (a.bits, a.signed, a.symmetric) == (8, True, False)
    assert recipe_from_dict(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("weight, inp, culprit", [
    ({"symmetric": False}, {}, "weight"),
    ({"signed": False}, {}, "weight"),
    ({}, {"signed": False}, "input"),
    ({}, {"bits": 16}, "input"),
])
def test_litert_recipe_refuses_what_the_interpreter_cannot_run(weight, inp, culprit):
    with pytest.raises(ValueError, match=f"litert.*{culprit}"):
        recipe_from_dict({"target": "litert", "weight": weight, "input": {"signed": True, **inp}})


class _PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 3)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        return self.fc(torch.flatten(self.conv2(x), 1))


def test_max_pool_keeps_its_input_qparams_and_logits_use_minmax():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    q = lowbit.quantize(_PoolNet().eval(), x, lowbit.preset("litert-int8"), x[:1])
    pool = next(n for n in q.graph.nodes if n.target == "pool")
    q_in = q.get_submodule(pool.args[0].target)  # the pool reads the quantized ReLU output ...
    assert isinstance(q_in, TensorQuantizer) and q_in.consumers == ["conv2"]
    after = [q.get_submodule(u.target) for u in pool.users]  # ... and the same quantizer is re-applied after it
    assert len(after) == 1 and isinstance(after[0], Requantize) and after[0].source is q_in
    outs = [m for n, m in q.lowbit_act.named_children() if n.endswith("_out") and isinstance(m, TensorQuantizer)]
    assert [m.spec.calibrator for m in outs] == ["minmax"]
    assert all(isinstance(m.spec.granularity, PerTensor) and m.spec.signed for m in outs)


@pytest.mark.parametrize("pads, kernel, stride, folds", [
    ((1, 1, 1, 1), 3, 1, True), ((2, 2, 2, 2), 5, 2, True), ((0, 1, 0, 1), 3, 2, False), ((1, 2, 1, 2), 5, 2, False),
])
def test_fold_zero_pads_is_exact(pads, kernel, stride, folds):
    torch.manual_seed(0)
    m = nn.Sequential(nn.ZeroPad2d(pads), nn.Conv2d(4, 4, kernel, stride, groups=4)).eval()
    gm, x = fx.symbolic_trace(m), torch.randn(2, 4, 12, 12)
    ref = gm(x)
    assert fold_zero_pads(gm) == int(folds)
    assert torch.equal(gm(x), ref)

