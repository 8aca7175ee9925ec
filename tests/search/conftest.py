"""Fixtures shared by the search tests: one thread, and a digits recipe coarse enough to lose accuracy."""

from __future__ import annotations

from dataclasses import replace

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


@pytest.fixture(scope="session")
def coarse():
    """3-bit weights, 4-bit activations: digits-cnn falls to ~0.82 agreement, so there is something to search."""
    r = lowbit.preset("int8")
    return replace(r, default_weight=replace(r.default_weight, bits=3), default_input=replace(r.default_input, bits=4))
