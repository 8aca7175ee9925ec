"""Shared test settings: deterministic torch seed for the pipeline tests, and a session-wide digits model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# The same examples on every run: a property test that passes in review passes in CI (a random draw once found a
# 6e-8 MILP tolerance case in a full run). Explore with HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SEEDED_DIRS = {"nn", "transforms", "export", "ptq", "cli", "report", "analysis"}


def pytest_runtest_setup(item):
    if item.path.parent.name in SEEDED_DIRS:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    """``(model, calib, eval_x, eval_y)`` for the zoo digits CNN (weights from the user cache; ~5 s to train once)."""
    from lowbit import zoo

    zm = zoo.load_model("digits-cnn")
    zd = zoo.load_data("digits")
    return zm.model, zd.calib, zd.eval_inputs, zd.eval_labels
