"""Shared fixtures for the zoo tests: one real DigitsCNN training per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Train the digits CNN once into a private cache dir.

    Returns:
        ``(cache_dir, state_dict)`` of the trained model; tests that need the
        cache set ``LOWBIT_CACHE_DIR`` to ``cache_dir`` themselves.
    """
    from lowbit.zoo.digits import load_digits_cnn

    cache_dir = tmp_path_factory.mktemp("lowbit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE_DIR", str(cache_dir))
        model = load_digits_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return cache_dir, state
