"""The CUDA suite: the whole pipeline on a GPU (``pytest tests/gpu`` on a machine with one).

Every test here is skipped with the reason "CUDA not available" when ``torch.cuda.is_available()`` is False,
so the CPU suite is unchanged. TF32 is switched off for these tests: CPU / CUDA comparisons then differ only
by the order of float reductions. ``LOWBIT_GPU_SUITE_DEVICE=cpu pytest tests/gpu -k digits`` dry-runs the
suite on the CPU (every comparison is then CPU against CPU: it checks the tests, not the device).
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("LOWBIT_GPU_SUITE_DEVICE", "cuda") != "cuda":
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_tf32():
    if not torch.cuda.is_available():
        torch.manual_seed(0)
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def zoo_pair():
    """``zoo_pair(name)`` → ``(model, example, calib, eval_x, eval_y)``, cached per model (data on the CPU)."""
    from lowbit import zoo

    cache = {}
    data_of = {"digits-cnn": ("digits", None, None), "efficientnet-lite0": ("photos", 64, 64)}

    def get(name: str):
        if name not in cache:
            zm = zoo.load_model(name)
            data, n_calib, n_eval = data_of[name]
            zd = zoo.load_data(data, n_calib=n_calib, n_eval=n_eval)
            cache[name] = (zm.model.eval(), zm.example_input, zd.calib, zd.eval_inputs, zd.eval_labels)
        return cache[name]

    return get
