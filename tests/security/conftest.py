"""Fixtures of the security tests: a digits-cnn deployment whose trusted set is the whole digits test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.zoo import load_data

from tests.serve.helpers import quantize_digits_dir

TOKEN = "security-test-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_data():
    """``(eval inputs [449, 1, 8, 8] float32, labels int64)``: the digits test split."""
    zd = load_data("digits")
    return zd.eval_inputs.numpy().astype(np.float32), zd.eval_labels.numpy()


@pytest.fixture(scope="session")
def guarded_dir(tmp_path_factory) -> Path:
    """A ``lowbit quantize --model digits-cnn --data digits`` folder; its trusted rows are the 449 test rows."""
    return quantize_digits_dir(tmp_path_factory.mktemp("security"))
