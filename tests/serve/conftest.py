"""Fixtures of the serving tests: a digits-cnn model folder made once per session, real digits inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.zoo import load_data

from .helpers import quantize_digits_dir


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A ``lowbit quantize --model digits-cnn --data digits`` folder (made once per session)."""
    return quantize_digits_dir(tmp_path_factory.mktemp("serve"), n_eval=64)


@pytest.fixture(scope="session")
def digits_inputs() -> np.ndarray:
    """Real digits ``[N, 1, 8, 8]`` float32 (the evaluation split)."""
    return load_data("digits").eval_inputs.numpy().astype(np.float32)
