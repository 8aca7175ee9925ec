"""Real colour photos bundled with scikit-image and scikit-learn, as EfficientNet inputs.

Only images that ship inside the installed wheels are used (no network, no
``pooch``). Each source photo belongs to exactly one split, so calibration and
evaluation views never share a pixel region:

=========  ======================================================================
split      source photos
=========  ======================================================================
``calib``  ``astronaut`` (skimage), ``rocket`` (skimage), ``china`` (sklearn)
``eval``   ``chelsea`` (skimage, a cat), ``coffee`` (skimage), ``flower``
           (sklearn), ``motorcycle`` (skimage ``stereo_motorcycle`` left view)
=========  ======================================================================

Deliberately excluded: ``skimage.data.cat`` (the same picture as ``chelsea``),
the right view of ``stereo_motorcycle`` (the same scene as the left view),
synthetic images (``colorwheel``, ``logo``), scientific images far from
ImageNet (``hubble_deep_field``, ``immunohistochemistry``, ``retina``) and the
grayscale photos (seven colour photos are enough).

Views are random resized crops (area 10-100 %, aspect 3/4-4/3) with random
horizontal flips, drawn from a NumPy ``PCG64`` stream seeded with
``(seed, split)`` and resized with Pillow, so they are identical across runs
and cheap (no torchvision). View ``i`` comes from photo ``i % k`` of its split,
and the first ``m`` views of a request for ``n >= m`` views equal a request
for ``m`` views.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from lowbit.zoo.efficientnet import INPUT_SIZE, MEAN_RGB_255, STD_RGB_255

logger = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "calib": ("astronaut", "rocket", "china"),
    "eval": ("chelsea", "coffee", "flower", "motorcycle"),
}
CROP_SCALE = (0.1, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

__all__ = [
    "PHOTO_SPLITS",
    "SPLITS",
    "available_photos",
    "center_view",
    "load_photo",
    "photo_views",
    "to_model_input",
]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _skimage_motorcycle_left() -> np.ndarray:
    import skimage.data

    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file_name)

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "rocket": _skimage("rocket"),
    "china": _sklearn("china.jpg"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "flower": _sklearn("flower.jpg"),
    "motorcycle": _skimage_motorcycle_left,
}


@functools.lru_cache(maxsize=None)
def _load_rgb(name: str) -> np.ndarray | None:
    """Load one photo as read-only ``uint8 [H, W, 3]``, or ``None`` if unavailable."""
    try:
        image = np.asarray(_LOADERS[name]())
    except Exception as exc:  # noqa: BLE001 - optional data files may be missing
        logger.warning("photo %r is not available offline, skipping it: %s", name, exc)
        return None
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    image.setflags(write=False)
    return image


def load_photo(name: str) -> np.ndarray:
    """Return a bundled photo as ``uint8 [H, W, 3]`` RGB (read-only).

    Args:
        name: One of the names in :data:`PHOTO_SPLITS`.

    Returns:
        The photo's pixels.

    Raises:
        ValueError: If ``name`` is not a known photo.
        RuntimeError: If the photo cannot be loaded from the installed packages.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown photo {name!r}; valid photos: {', '.join(_LOADERS)}")
    image = _load_rgb(name)
    if image is None:
        raise RuntimeError(f"photo {name!r} is not available offline")
    return image


def available_photos(split: str) -> tuple[str, ...]:
    """Return the photos of ``split`` that can be loaded offline, in split order.

    Args:
        split: ``"calib"`` or ``"eval"``.

    Returns:
        Photo names (a subset of ``PHOTO_SPLITS[split]``).

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in PHOTO_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return tuple(name for name in PHOTO_SPLITS[split] if _load_rgb(name) is not None)


def to_model_input(pixels: np.ndarray) -> torch.Tensor:
    """Normalise ``uint8 [N, H, W, 3]`` RGB pixels into EfficientNet-Lite0 input.

    Args:
        pixels: RGB pixel batch on the 0..255 scale.

    Returns:
        ``float32 [N, 3, H, W]`` tensor, ``(pixel - 127) / 128``.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    mean = torch.tensor(MEAN_RGB_255, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB_255, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32) - mean) / std


def _crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """Draw a random-resized-crop box ``(left, top, right, bottom)`` inside the image."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    side = min(height, width)  # fallback: central square
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def _split_rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split)])


def photo_views(split: str, n: int, seed: int = 0, size: int = INPUT_SIZE) -> torch.Tensor:
    """Generate ``n`` augmented views of the photos of one split.

    Args:
        split: ``"calib"`` or ``"eval"``; the two use disjoint source photos.
        n: Number of views (``>= 0``).
        seed: Seed of the crop/flip stream; same arguments give the same views.
        size: Output side length in pixels.

    Returns:
        ``float32 [n, 3, size, size]`` tensor normalised for EfficientNet-Lite0.

    Raises:
        ValueError: If ``split`` is unknown or ``n``/``size`` are invalid.
        RuntimeError: If no photo of the split is available offline.
    """
    if n < 0 or size <= 0:
        raise ValueError(f"need n >= 0 and size > 0, got n={n}, size={size}")
    names = available_photos(split)
    if not names:
        raise RuntimeError(f"no photo of split {split!r} is available offline")
    rng = _split_rng(split, seed)
    images = [Image.fromarray(load_photo(name)) for name in names]
    batch = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        image = images[i % len(images)]
        box = _crop_box(rng, image.height, image.width)
        flip = bool(rng.random() < 0.5)
        view = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
        batch[i] = view[:, ::-1] if flip else view
    logger.debug("generated %d %s views from %s", n, split, ", ".join(names))
    return to_model_input(batch)


def center_view(name: str, size: int = INPUT_SIZE) -> torch.Tensor:
    """Return the central square of one photo, resized, as a batch of one.

    Args:
        name: A photo name from :data:`PHOTO_SPLITS`.
        size: Output side length in pixels.

    Returns:
        ``float32 [1, 3, size, size]`` tensor normalised for EfficientNet-Lite0.
    """
    image = Image.fromarray(load_photo(name))
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    box = (left, top, left + side, top + side)
    view = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return to_model_input(view[None])
