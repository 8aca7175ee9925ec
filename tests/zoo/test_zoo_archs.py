"""The reference zoo (lowbit.zoo.archs / blocks): builds offline, reproducible weights, documented shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.zoo as zoo
from lowbit.zoo import archs

IMAGE = (1, 3, archs.IMAGE_SIZE, archs.IMAGE_SIZE)
TOKENS = (1, 64)
OUTPUT_SHAPES = {
    "resnet18": (1, 1000), "convnext-atto": (1, 1000), "mobilenet-v2": (1, 1000), "mobilevit-xxs": (1, 1000),
    "efficientnet-b0": (1, 1000), "regnetx-200mf": (1, 1000), "vit-tiny": (1, 1000), "swin-tiny": (1, 1000),
    "bert-mini": (1, 64, 256), "gpt2-small": (1, 64, 30522), "silu-hardswish-cnn": (1, 1000),
    "unet-tiny": (1, 4, 224, 224), "lstm-tagger": (1, 64, 17),
}
# the modules each family is in the zoo for
REQUIRED_MODULES = {
    "resnet18": ("ResNetBasicLayer",), "convnext-atto": ("ConvNextLayer",),
    "mobilenet-v2": ("MobileNetV2InvertedResidual",), "mobilevit-xxs": ("MobileViTTransformer",),
    "efficientnet-b0": ("EfficientNetSqueezeExciteLayer", "SiLU"), "regnetx-200mf": ("RegNetXLayer",),
    "vit-tiny": ("ViTLayer",), "swin-tiny": ("SwinLayer",), "bert-mini": ("BertLayer",), "gpt2-small": ("GPT2Block",),
    "silu-hardswish-cnn": ("SiLU", "Hardswish"), "unet-tiny": ("ConvTranspose2d",), "lstm-tagger": ("LSTM",),
}


def test_registry_lists_every_reference_model() -> None:
    assert zoo.REFERENCE_ZOO == archs.REFERENCE_ZOO
    assert set(zoo.REFERENCE_ZOO) == set(OUTPUT_SHAPES) == set(REQUIRED_MODULES)
    assert set(zoo.REFERENCE_ZOO) <= set(zoo.MODEL_NAMES)
    assert {archs.ARCHS[n].data for n in zoo.REFERENCE_ZOO} == {"photos", "sentences"}


def test_unknown_reference_model() -> None:
    with pytest.raises(ValueError, match="unknown reference model 'resnet-9000'.*resnet18"):
        archs.build("resnet-9000")


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    return {}


def _get(built: dict, name: str) -> tuple[nn.Module, torch.Tensor]:
    if name not in built:
        built[name] = archs.build(name)
    return built[name]


@pytest.mark.parametrize("name", archs.REFERENCE_ZOO)
def test_forward_shape_and_finite(built, name: str) -> None:
    model, example = _get(built, name)
    assert not model.training and not any(m.training for m in model.modules())
    if archs.ARCHS[name].data == "photos":
        assert example.shape == IMAGE and example.dtype == torch.float32
    else:
        assert example.shape == TOKENS and example.dtype == torch.int64
        assert 0 <= int(example.min()) and int(example.max()) < archs.VOCAB_SIZE
    with torch.no_grad():
        out = model(example)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()
    assert out.float().std() > 1e-3, "activations collapsed (random initialisation too small)"
    kinds = {type(m).__name__ for m in model.modules()}
    assert set(REQUIRED_MODULES[name]) <= kinds, set(REQUIRED_MODULES[name]) - kinds


@pytest.mark.parametrize("name", archs.REFERENCE_ZOO)
def test_weights_are_reproducible(built, name: str) -> None:
    model, example = _get(built, name)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again, example2 = archs.build(name)
    assert torch.equal(torch.rand(1), before), "build must not move the caller's RNG"
    assert torch.equal(example, example2)
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ["vit-tiny", "silu-hardswish-cnn", "lstm-tagger"])
def test_seed_changes_weights(built, name: str) -> None:
    ours = _get(built, name)[0].state_dict()
    other = archs.build(name, seed=1)[0].state_dict()
    assert any(not torch.equal(ours[k], other[k]) for k in ours if ours[k].is_floating_point())


def test_attention_implementations(built) -> None:
    """ViT, BERT and GPT-2 use the library default SDPA attention; Swin and MobileViT only have eager attention."""
    for name in ("vit-tiny", "bert-mini", "gpt2-small"):
        assert _get(built, name)[0].model.config._attn_implementation == "sdpa", name


def test_batchnorm_is_settled(built) -> None:
    """BN statistics come from photos, so folding BN into the convolutions is not the identity."""
    model, _ = _get(built, "mobilenet-v2")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) > 0 for bn in bns)
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)


@pytest.mark.parametrize("name", ["unet-tiny", "bert-mini"])
def test_load_model_matches_data(name: str) -> None:
    entry = zoo.load_model(name)
    data = zoo.load_data(entry.default_data, n_calib=2, n_eval=2)
    assert entry.default_data == archs.ARCHS[name].data
    assert entry.example_input.shape[1:] == data.calib.shape[1:]
    with torch.no_grad():
        assert entry.model(data.calib).shape[0] == 2
