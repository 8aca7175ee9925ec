"""Fixtures for the core math tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """These tests work on small tensors, where torch's intra-op thread pool only adds synchronisation cost
    (and on a busy 2-core machine, spin-waiting that makes the MSE searches ~50x slower). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
