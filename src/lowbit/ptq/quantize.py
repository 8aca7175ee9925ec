"""One call for post-training quantization: prepare_ → calibrate → convert_ on a copy of the model."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.ptq.calibrate import Data, calibrate
from lowbit.transforms.prepare import convert_, prepare_
from lowbit.transforms.recipe import Recipe


def quantize(model: nn.Module, calib_data: Data, recipe: Recipe, example_input: torch.Tensor | None = None,
             show_progress: bool = True) -> nn.Module:
    """prepare_ → calibrate → convert_ on a copy of ``model``; returns the converted (fake-quantized) model."""
    prepared = prepare_(copy.deepcopy(model).eval(), recipe, example_input)
    calibrate(prepared, calib_data, show_progress=show_progress)
    return convert_(prepared)
