"""Fixtures shared by the analysis tests."""

from __future__ import annotations

import pytest
import torch

import lowbit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs run far faster on one thread (and do not fight parallel test runs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qdigits(digits):
    """digits-cnn quantized with the int8 preset, and its calibration inputs."""
    model, calib, _, _ = digits
    return lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False), calib
