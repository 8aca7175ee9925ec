"""Hand-written reference blocks (plain ``torch.nn``) for patterns the Hugging Face models do not cover.

* :class:`SiluHardswishCNN` (``"silu-hardswish-cnn"``): SiLU and Hardswish between grouped and depthwise
  convolutions, each followed by BatchNorm; ``[N, 3, 224, 224]`` → logits ``[N, 1000]``.
* :class:`UNetTiny` (``"unet-tiny"``): a two-level U-Net, strided-conv downsampling, ``ConvTranspose2d``
  upsampling and ``torch.cat`` skips; ``[N, 3, 224, 224]`` → per-pixel logits ``[N, 4, 224, 224]``.
* :class:`LSTMTagger` (``"lstm-tagger"``): ``Embedding`` → one-layer ``nn.LSTM`` → ``Linear`` over token ids
  ``[N, 64]`` → per-token tag logits ``[N, 64, 17]``.

Built through :func:`lowbit.zoo.archs.build`, the image blocks get He-normal convolutions and BatchNorm
statistics measured on photos (:func:`lowbit.zoo.archs.settle_batchnorm`), so BN folding is not the identity.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LSTMTagger", "SiluHardswishCNN", "UNetTiny"]

N_CLASSES = 1000
N_SEG_CLASSES = 4
N_TAGS = 17


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), act)


class SiluHardswishCNN(nn.Module):
    """SiLU / Hardswish activations between grouped, depthwise and pointwise convolutions with BatchNorm."""

    def __init__(self, num_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 32, 3, 2, 1, nn.SiLU()),         # 112
            _conv_bn(32, 64, 3, 2, 4, nn.Hardswish()),   # 56, grouped (4 groups)
            _conv_bn(64, 64, 3, 1, 64, nn.SiLU()),       # depthwise
            _conv_bn(64, 128, 1, 1, 8, nn.Hardswish()),  # grouped pointwise (8 groups)
            _conv_bn(128, 128, 3, 2, 16, nn.SiLU()),     # 28, grouped (16 groups)
            _conv_bn(128, 256, 1, 1, 1, nn.Hardswish()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, 3, H, W]``."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class UNetTiny(nn.Module):
    """Two-level U-Net: strided-conv encoder, ``ConvTranspose2d`` decoder, ``torch.cat`` skip connections."""

    def __init__(self, num_classes: int = N_SEG_CLASSES) -> None:
        super().__init__()
        self.enc1 = _conv_bn(3, 16, 3, 1, 1, nn.ReLU())    # 224
        self.enc2 = _conv_bn(16, 32, 3, 2, 1, nn.ReLU())   # 112
        self.bottom = _conv_bn(32, 64, 3, 2, 1, nn.ReLU())  # 56
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)  # 112
        self.dec2 = _conv_bn(64, 32, 3, 1, 1, nn.ReLU())
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)  # 224
        self.dec1 = _conv_bn(32, 16, 3, 1, 1, nn.ReLU())
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits ``[N, num_classes, H, W]`` of images ``[N, 3, H, W]`` (H, W divisible by 4)."""
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class LSTMTagger(nn.Module):
    """Sequence tagger: token ``Embedding`` → batch-first ``nn.LSTM`` → ``Linear`` to tag logits."""

    def __init__(self, vocab_size: int = 30522, embed: int = 128, hidden: int = 256, num_tags: int = N_TAGS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, num_layers=1, batch_first=True)
        self.proj = nn.Linear(hidden, num_tags)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Tag logits ``[N, L, num_tags]`` of token ids ``[N, L]``."""
        out, _ = self.lstm(self.embed(ids))
        return self.proj(out)
