"""Shared fixtures of the observer tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run each module with one intra-op thread, then restore the setting.

    These tests run many small tensor ops in loops (hypothesis examples, candidate grids); each op pays an
    OpenMP barrier, and on a busy 2-core runner two threads made the folder about twice as slow in CPU time.
    No result depends on the thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
