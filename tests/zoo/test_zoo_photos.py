"""Photo views: shape, determinism, and disjoint calib/eval sources."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lowbit.zoo import photos


def test_splits_use_disjoint_available_photos() -> None:
    calib, evals = photos.available_photos("calib"), photos.available_photos("eval")
    assert calib and evals
    assert not set(photos.PHOTO_SPLITS["calib"]) & set(photos.PHOTO_SPLITS["eval"])
    digests = {
        name: hashlib.sha256(photos.load_photo(name).tobytes()).hexdigest()
        for name in calib + evals
    }
    assert len(set(digests.values())) == len(digests), "two photo names share pixels"


@pytest.mark.parametrize("name", photos.PHOTO_SPLITS["calib"] + photos.PHOTO_SPLITS["eval"])
def test_photos_are_rgb_uint8(name: str) -> None:
    image = photos.load_photo(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 224
    assert not image.flags.writeable


def test_views_shape_range_and_determinism() -> None:
    views = photos.photo_views("calib", 6, seed=0)
    assert views.shape == (6, 3, 224, 224) and views.dtype == torch.float32
    assert views.min() >= -127 / 128 and views.max() <= 128 / 128
    assert torch.equal(views, photos.photo_views("calib", 6, seed=0))
    assert torch.equal(views[:3], photos.photo_views("calib", 3, seed=0))
    assert not torch.equal(views, photos.photo_views("calib", 6, seed=1))
    small = photos.photo_views("eval", 2, seed=0, size=64)
    assert small.shape == (2, 3, 64, 64)


def test_calib_and_eval_views_differ() -> None:
    calib = photos.photo_views("calib", 4)
    evals = photos.photo_views("eval", 4)
    assert not any(torch.equal(c, e) for c in calib for e in evals)


def test_views_are_augmented() -> None:
    views = photos.photo_views("eval", 8)
    k = len(photos.available_photos("eval"))
    assert not torch.equal(views[0], views[k]), "same photo, different crop"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nope"):
        photos.photo_views("nope", 2)
    with pytest.raises(ValueError):
        photos.photo_views("calib", -1)
    with pytest.raises(ValueError, match="nope"):
        photos.load_photo("nope")
    assert photos.photo_views("eval", 0).shape == (0, 3, 224, 224)
