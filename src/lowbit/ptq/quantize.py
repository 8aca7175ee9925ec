"""One call for post-training quantization: prepare_ → [passes] → calibrate → convert_ → [passes] on a copy."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.data import Data
from lowbit.ptq.passes import quantize_with_passes
from lowbit.transforms.recipe import Recipe


def quantize(model: nn.Module, calib_data: Data, recipe: Recipe, example_input: torch.Tensor | None = None,
             show_progress: bool = True, pass_batches: int | None = None) -> nn.Module:
    """prepare_ → calibrate → convert_ on a copy of ``model``, with the recipe's passes in pipeline order
    (see ``lowbit.ptq.passes``); returns the converted (fake-quantized) model.

    Args:
        pass_batches: the passes see at most this many calibration batches (None: all).
    """
    return quantize_with_passes(model, calib_data, recipe, example_input, show_progress, pass_batches)
