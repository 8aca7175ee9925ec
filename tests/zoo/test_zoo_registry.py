"""The lowbit.zoo registry: names, defaults, errors, cheap import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit.zoo as zoo
from lowbit.zoo.digits import load_digits_split


@pytest.mark.parametrize("loader", [zoo.load_model, zoo.load_data])
def test_unknown_name_raises(loader) -> None:
    with pytest.raises(ValueError) as info:
        loader("resnet-9000")
    message = str(info.value)
    assert "resnet-9000" in message
    valid = zoo.MODEL_NAMES if loader is zoo.load_model else zoo.DATA_NAMES
    assert all(name in message for name in valid)


def test_digits_data_defaults() -> None:
    split = load_digits_split()
    data = zoo.load_data("digits")
    assert data.name == "digits"
    assert torch.equal(data.calib, split.x_calib)
    assert torch.equal(data.eval_inputs, split.x_test)
    assert data.eval_labels is not None and torch.equal(data.eval_labels, split.y_test)
    assert data.eval_labels.dtype == torch.int64


def test_digits_data_subsets() -> None:
    data = zoo.load_data("digits", n_calib=10, n_eval=20, seed=3)
    assert data.calib.shape == (10, 1, 8, 8) and data.eval_inputs.shape == (20, 1, 8, 8)
    again = zoo.load_data("digits", n_calib=10, n_eval=20, seed=3)
    assert torch.equal(data.eval_inputs, again.eval_inputs)
    with pytest.raises(ValueError, match="n_eval"):
        zoo.load_data("digits", n_eval=10_000)
    with pytest.raises(ValueError, match="n_calib"):
        zoo.load_data("digits", n_calib=0)


def test_photos_data() -> None:
    data = zoo.load_data("photos", n_calib=4, n_eval=8)
    assert data.calib.shape == (4, 3, 224, 224) and data.eval_inputs.shape == (8, 3, 224, 224)
    assert data.eval_labels is None


def test_photos_data_default_sizes() -> None:
    data = zoo.load_data("photos")
    assert len(data.calib) == 64 and len(data.eval_inputs) == 256


def test_load_models(digits_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(digits_cache[0]))
    for name in zoo.MODEL_NAMES:
        entry = zoo.load_model(name)
        assert entry.name == name and entry.default_data in zoo.DATA_NAMES
        assert not entry.model.training and entry.example_input.shape[0] == 1
        data = zoo.load_data(entry.default_data, n_calib=2, n_eval=2)
        assert entry.example_input.shape[1:] == data.calib.shape[1:]
        with torch.no_grad():
            assert entry.model(entry.example_input).shape[0] == 1


def test_import_is_cheap() -> None:
    code = (
        "import sys, lowbit.zoo\n"
        "heavy = [m for m in ('sklearn', 'skimage', 'efficientnet_lite_pytorch', 'PIL', 'transformers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    src = Path(zoo.__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
