"""EfficientNet-Lite0: strict weights, fx-traceability, parity with the package, sanity."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

from lowbit.zoo import efficientnet as eff
from lowbit.zoo.photos import center_view

# ImageNet-1k class indices.
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
MOTORCYCLE_CLASSES = {665, 670}  # moped, motor scooter


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return eff.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def package_model() -> nn.Module:
    return eff.load_package_efficientnet_lite0()


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    return torch.cat([center_view(n) for n in ("chelsea", "coffee", "motorcycle", "astronaut")])


@pytest.fixture(scope="module")
def logits(model: nn.Module, photo_batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(photo_batch)


def test_checkpoint_keys_match_exactly(model: nn.Module) -> None:
    ckpt = torch.load(eff.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert set(state) == set(ckpt)
    assert all(torch.equal(state[k], ckpt[k]) for k in ckpt)


def test_eval_mode_and_constants(model: nn.Module) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert eff.INPUT_SIZE == 224
    assert eff.MEAN_RGB_255 == (127.0,) * 3 and eff.STD_RGB_255 == (128.0,) * 3
    assert eff.MEAN_RGB[0] == pytest.approx(127 / 255)


def test_fx_trace_plain_layers(model: nn.Module) -> None:
    gm = torch.fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    modules = [gm.get_submodule(n.target) for n in nodes if n.op == "call_module"]
    assert sum(type(m) is nn.Conv2d for m in modules) == 49
    assert sum(type(m) is nn.BatchNorm2d for m in modules) == 49
    assert not any(n.op == "call_function" and n.target is torch.conv2d for n in nodes)
    assert sum(n.op == "call_function" and n.target is operator.add for n in nodes) == 9
    called = [n.target for n in nodes if n.op == "call_module"]
    assert len(called) == len(set(called)), "every module instance is used at one call site"


def test_matches_package_model(
    model: nn.Module, package_model: nn.Module, photo_batch: torch.Tensor, logits: torch.Tensor
) -> None:
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        reference = package_model(photo_batch)
        traced = gm(photo_batch)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(traced, reference, rtol=0, atol=1e-6)


def test_predicts_real_photos(logits: torch.Tensor) -> None:
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert CAT_CLASSES & set(top5[0]), top5[0]
    assert top5[1][0] in COFFEE_CLASSES, top5[1]
    assert top5[2][0] in MOTORCYCLE_CLASSES, top5[2]
