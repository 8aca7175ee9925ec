"""The reference zoo: random-initialised models at real layer shapes, built offline from configs.

Hugging Face ``transformers`` model classes are built from configuration objects only (no ``from_pretrained``,
nothing downloaded; the hub is switched off before ``transformers`` is imported) with a fixed seed, so the
weights are the same on every call. Depth is cut down where the full model would be slow on a small CPU;
widths, kernel sizes, heads and patch sizes are those of the named model. Attention uses the library default
(``attn_implementation="sdpa"``, ``torch.nn.functional.scaled_dot_product_attention``, for ViT, BERT and GPT-2;
Swin and MobileViT have only their own eager attention: explicit ``matmul`` + ``softmax``).

======================  =================================================  =====================================
name                    model                                              input → output
======================  =================================================  =====================================
``resnet18``            ResNet-18 (basic blocks, 64..512), depths 1-1-1-1  image → logits ``[N, 1000]``
``convnext-atto``       ConvNeXt-Atto (40..320), depths 1-1-2-1            image → logits ``[N, 1000]``
``mobilenet-v2``        MobileNetV2 1.0 (all 17 inverted residuals)        image → logits ``[N, 1000]``
``mobilevit-xxs``       MobileViT-XXS (hidden 64/80/96)                    image → logits ``[N, 1000]``
``efficientnet-b0``     EfficientNet-B0 widths, SiLU, depth x0.5           image → logits ``[N, 1000]``
``regnetx-200mf``       RegNetX-200MF (24..368, groups 8), depths 1-1-2-2  image → logits ``[N, 1000]``
``vit-tiny``            ViT-Tiny/16 (192, 3 heads), 2 layers               image → logits ``[N, 1000]``
``swin-tiny``           Swin-T (96, heads 3-6-12-24, window 7), 1-1-2-1    image → logits ``[N, 1000]``
``bert-mini``           BERT-mini (256, 4 heads, 4 layers)                 ids → hidden states ``[N, L, 256]``
``gpt2-small``          GPT-2 small (768, 12 heads), 2 layers              ids → logits ``[N, L, 30522]``
``silu-hardswish-cnn``  :class:`~lowbit.zoo.blocks.SiluHardswishCNN`       image → logits ``[N, 1000]``
``unet-tiny``           :class:`~lowbit.zoo.blocks.UNetTiny`               image → pixel logits ``[N, 4, H, W]``
``lstm-tagger``         :class:`~lowbit.zoo.blocks.LSTMTagger`             ids → tag logits ``[N, L, 17]``
======================  =================================================  =====================================

Images are ``float32 [N, 3, 224, 224]`` (ImageNet-normalised photo views, data ``"photos"``); token ids are
``int64 [N, 64]`` from the MiniLM tokenizer (vocabulary 30522, data ``"sentences"``, right-padded with id 0).
Text models take the ids only; BERT and GPT-2 derive their attention mask from them (``ids != 0``). Models with
BatchNorm get He-normal convolutions and BN statistics measured on photos (:func:`settle_batchnorm`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

SEED = 0
IMAGE_SIZE = 224
VOCAB_SIZE = 30522  # the MiniLM (bert-base-uncased) WordPiece vocabulary the "sentences" data is tokenized with
N_CLASSES = 1000
PAD_ID = 0
BN_IMAGES, BN_BATCH, BN_SEED = 8, 8, 1  # photo views BatchNorm statistics are measured on (see settle_batchnorm)

__all__ = ["ARCHS", "ArchSpec", "IMAGE_SIZE", "REFERENCE_ZOO", "SEED", "build", "example_input"]


class ImageLogits(nn.Module):
    """Wrap a ``transformers`` image classifier so that ``forward(pixels)`` returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_labels]`` of images ``[N, 3, H, W]``."""
        return self.model(pixel_values=x).logits


class TextOutput(nn.Module):
    """Wrap a ``transformers`` text model so that ``forward(ids)`` returns one tensor (``field`` of its output).

    The attention mask is derived from the ids (``ids != 0``, the ``[PAD]`` id), so the model has one input.
    Passing a mask also keeps ``transformers`` from probing ``position_ids`` for packed sequences with
    ``torch.diff``, which the TorchScript ONNX exporter cannot export.
    """

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``field`` (``logits`` or ``last_hidden_state``) for token ids ``[N, L]``."""
        return getattr(self.model(input_ids=ids, attention_mask=(ids != PAD_ID).long()), self.field)


def _transformers():
    """Import ``transformers`` with every hub access switched off."""
    from lowbit.zoo.minilm import set_offline

    set_offline()
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("the reference zoo needs the package transformers>=4.50 (pip install transformers)") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _image(cls_name: str, cfg_name: str, **cfg) -> nn.Module:
    """``cls_name(cfg_name(**cfg))`` with 1000 classes, wrapped to return logits (attention: library default)."""
    tf = _transformers()
    config = getattr(tf, cfg_name)(num_labels=N_CLASSES, **cfg)
    return ImageLogits(getattr(tf, cls_name)(config))


def _resnet18() -> nn.Module:
    return _image("ResNetForImageClassification", "ResNetConfig", embedding_size=64, layer_type="basic",
                  hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], hidden_act="relu")


def _convnext_atto() -> nn.Module:
    return _image("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[40, 80, 160, 320],
                  depths=[1, 1, 2, 1], image_size=IMAGE_SIZE)


def _mobilenet_v2() -> nn.Module:
    return _image("MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=1.0,
                  image_size=IMAGE_SIZE)


def _mobilevit_xxs() -> nn.Module:
    return _image("MobileViTForImageClassification", "MobileViTConfig", image_size=IMAGE_SIZE,
                  hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0)


def _efficientnet_b0() -> nn.Module:
    return _image("EfficientNetForImageClassification", "EfficientNetConfig", image_size=IMAGE_SIZE,
                  width_coefficient=1.0, depth_coefficient=0.5, hidden_dim=1280, hidden_act="swish",
                  dropout_rate=0.2)


def _regnetx_200mf() -> nn.Module:
    return _image("RegNetForImageClassification", "RegNetConfig", embedding_size=32, layer_type="x",
                  hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 2, 2], groups_width=8, hidden_act="relu")


def _vit_tiny() -> nn.Module:
    return _image("ViTForImageClassification", "ViTConfig", attn_implementation="sdpa", hidden_size=192,
                  num_hidden_layers=2, num_attention_heads=3, intermediate_size=768, image_size=IMAGE_SIZE,
                  patch_size=16)


def _swin_tiny() -> nn.Module:
    return _image("SwinForImageClassification", "SwinConfig", image_size=IMAGE_SIZE, patch_size=4, embed_dim=96,
                  depths=[1, 1, 2, 1], num_heads=[3, 6, 12, 24], window_size=7)


def _bert_mini() -> nn.Module:
    tf = _transformers()
    config = tf.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, attn_implementation="sdpa")
    return TextOutput(tf.BertModel(config, add_pooling_layer=False), "last_hidden_state")


def _gpt2_small() -> nn.Module:
    tf = _transformers()
    config = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=768, n_layer=2, n_head=12, use_cache=False,
                           attn_implementation="sdpa")
    return TextOutput(tf.GPT2LMHeadModel(config), "logits")


def _blocks(cls_name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from lowbit.zoo import blocks

        return getattr(blocks, cls_name)()

    return make


@dataclass(frozen=True)
class ArchSpec:
    """One reference model.

    Attributes:
        name: Registry name.
        family: What it stands for (``"cnn"``, ``"hybrid"``, ``"vision-transformer"``, ``"transformer"``, ...).
        data: Default zoo data set (``"photos"`` or ``"sentences"``).
        output: ``"logits"`` (classes on the last axis), ``"pixel-logits"`` (classes on axis 1) or
            ``"features"`` (no classes: top-1 agreement does not apply).
        make: Builds the float model (weights from the torch RNG).
    """

    name: str
    family: str
    data: str
    output: str
    make: Callable[[], nn.Module]


ARCHS: dict[str, ArchSpec] = {s.name: s for s in (
    ArchSpec("resnet18", "cnn", "photos", "logits", _resnet18),
    ArchSpec("convnext-atto", "cnn", "photos", "logits", _convnext_atto),
    ArchSpec("mobilenet-v2", "mobile-cnn", "photos", "logits", _mobilenet_v2),
    ArchSpec("mobilevit-xxs", "hybrid", "photos", "logits", _mobilevit_xxs),
    ArchSpec("efficientnet-b0", "mobile-cnn", "photos", "logits", _efficientnet_b0),
    ArchSpec("regnetx-200mf", "cnn", "photos", "logits", _regnetx_200mf),
    ArchSpec("vit-tiny", "vision-transformer", "photos", "logits", _vit_tiny),
    ArchSpec("swin-tiny", "vision-transformer", "photos", "logits", _swin_tiny),
    ArchSpec("bert-mini", "transformer", "sentences", "features", _bert_mini),
    ArchSpec("gpt2-small", "transformer", "sentences", "logits", _gpt2_small),
    ArchSpec("silu-hardswish-cnn", "block", "photos", "logits", _blocks("SiluHardswishCNN")),
    ArchSpec("unet-tiny", "block", "photos", "pixel-logits", _blocks("UNetTiny")),
    ArchSpec("lstm-tagger", "block", "sentences", "logits", _blocks("LSTMTagger")),
)}
REFERENCE_ZOO = tuple(ARCHS)


def example_input(data: str) -> torch.Tensor:
    """A batch of one valid input for a model whose default data is ``data`` (the first calibration sample).

    Args:
        data: ``"photos"`` or ``"sentences"``.

    Returns:
        ``float32 [1, 3, 224, 224]`` or ``int64 [1, 64]``.
    """
    if data == "photos":
        from lowbit.zoo.photos import photo_views

        return photo_views("calib", 1, seed=0, size=IMAGE_SIZE)
    if data == "sentences":
        from lowbit.zoo.minilm import tokenize
        from lowbit.zoo.sentences import SEQ_LEN, sentence_split

        return tokenize(sentence_split(1, 1)[0], SEQ_LEN)
    raise ValueError(f"no example input for data set {data!r}; reference models use photos or sentences")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def settle_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """He-normal convolution weights, BatchNorm scale/shift drawn around 1/0, running statistics measured on ``images``.

    A freshly initialised BatchNorm network is the identity in eval mode (running mean 0, variance 1), and
    ``transformers``' small-std initialisation (convolutions, and for EfficientNet even BatchNorm scales, drawn
    with std 0.02) makes the deep mobile networks (MobileNetV2, EfficientNet, MobileViT) collapse to outputs of
    ~1e-20. Re-drawing the convolutions with He-normal weights (fan-in, the scale of trained weights), the
    BatchNorm scales from U(0.5, 1.5) and shifts from U(-0.2, 0.2), and measuring every BatchNorm's statistics on
    real images (cumulative average; dropout and stochastic depth stay off) gives unit-scale activations.

    Args:
        model: A float model; modified in place and left in eval mode.
        images: Input batch the statistics are measured on.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
                if mod.bias is not None:
                    mod.bias.zero_()
        model.eval()
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the batches below
            bn.train()
        for batch in images.split(BN_BATCH):
            model(batch)
    model.eval()


def build(name: str, seed: int = SEED) -> tuple[nn.Module, torch.Tensor]:
    """Build a reference model with reproducible random weights.

    The global torch RNG state is saved and restored, so building a model does not disturb the caller's seed.

    Args:
        name: One of :data:`REFERENCE_ZOO`.
        seed: ``torch.manual_seed`` used for the weights.

    Returns:
        ``(model in eval mode, example input batch of one)``.

    Raises:
        ValueError: If ``name`` is not a reference model.
    """
    spec = ARCHS.get(name)
    if spec is None:
        raise ValueError(f"unknown reference model {name!r}; valid: {', '.join(REFERENCE_ZOO)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.make()
        if spec.data == "photos" and _has_batchnorm(model):
            from lowbit.zoo.photos import photo_views

            settle_batchnorm(model, photo_views("calib", BN_IMAGES, seed=BN_SEED, size=IMAGE_SIZE))
    model.eval()
    log.debug("built %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model, example_input(spec.data)
