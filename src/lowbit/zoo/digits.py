"""Real handwritten digits (scikit-learn ``load_digits``) and a small residual CNN.

The 1797 labelled 8x8 digits are split once, with a fixed seed, into disjoint
train / calib / test subsets (60 / 15 / 25 %). Inputs are ``float32
[N, 1, 8, 8]`` in ``[0, 1]`` (pixel / 16) and labels ``int64``.

:class:`DigitsCNN` is a quantization test subject with the usual patterns:
conv-BN-ReLU, a residual block whose identity add is a functional ``+``
followed by ReLU, a strided (downsampling) conv, global average pooling and a
linear classifier. :func:`load_digits_cnn` trains it once (deterministically,
a few seconds on CPU) and caches the weights under :func:`user_cache_dir`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.zoo.cache import save_atomic, user_cache_dir

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.60, 0.15, 0.25)  # train, calib, test
ARCH_VERSION = 1  # bump when DigitsCNN or the training recipe changes meaning
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4

__all__ = [
    "DigitsCNN",
    "DigitsSplit",
    "accuracy",
    "digits_cache_path",
    "load_digits_cnn",
    "load_digits_split",
    "train_digits_cnn",
]


@dataclass(frozen=True)
class DigitsSplit:
    """Disjoint fixed-seed subsets of scikit-learn's digits.

    Attributes:
        x_train: ``float32 [N_train, 1, 8, 8]`` in ``[0, 1]``.
        y_train: ``int64 [N_train]`` labels 0-9.
        x_calib: Calibration inputs (labels in ``y_calib``).
        y_calib: ``int64 [N_calib]``.
        x_test: Held-out test inputs.
        y_test: ``int64 [N_test]``.
        train_idx: Row indices into ``load_digits()`` of the train subset.
        calib_idx: Row indices of the calib subset.
        test_idx: Row indices of the test subset.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_idx: np.ndarray
    calib_idx: np.ndarray
    test_idx: np.ndarray


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    return images, np.asarray(bunch.target, dtype=np.int64)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=4)
def load_digits_split(seed: int = SPLIT_SEED) -> DigitsSplit:
    """Return the train / calib / test split of scikit-learn's digits.

    Args:
        seed: Seed of the row permutation; the default is the canonical split.

    Returns:
        A :class:`DigitsSplit` (cached; treat its tensors as read-only).
    """
    images, labels = _raw_digits()
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(SPLIT_FRACTIONS[0] * n))
    n_calib = int(round(SPLIT_FRACTIONS[1] * n))
    idx = np.split(order, [n_train, n_train + n_calib])
    xs = [torch.from_numpy(images[i][:, None].copy()) for i in idx]
    ys = [torch.from_numpy(labels[i]) for i in idx]
    return DigitsSplit(
        x_train=xs[0],
        y_train=ys[0],
        x_calib=xs[1],
        y_calib=ys[1],
        x_test=xs[2],
        y_test=ys[2],
        train_idx=_readonly(idx[0]),
        calib_idx=_readonly(idx[1]),
        test_idx=_readonly(idx[2]),
    )


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
    return conv, nn.BatchNorm2d(c_out)


class DigitsCNN(nn.Module):
    """Small residual CNN for 8x8 digits, traceable by ``torch.fx``.

    ``conv-bn-relu (16ch, 8x8) -> [conv-bn-relu-conv-bn] + identity -> relu
    -> strided conv-bn-relu (32ch, 4x4) -> global avg pool -> linear(10)``.
    Every activation call site has its own ``nn.ReLU`` module.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        """Create the network.

        Args:
            width: Channels of the stem and residual block (doubled after downsampling).
            num_classes: Number of output logits.
        """
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(1, width)
        self.relu1 = nn.ReLU()
        self.res_conv1, self.res_bn1 = _conv_bn(width, width)
        self.res_relu = nn.ReLU()
        self.res_conv2, self.res_bn2 = _conv_bn(width, width)
        self.res_out_relu = nn.ReLU()
        self.down_conv, self.down_bn = _conv_bn(width, 2 * width, stride=2)
        self.down_relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify ``[N, 1, 8, 8]`` inputs in ``[0, 1]``; returns logits ``[N, 10]``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.res_relu(self.res_bn1(self.res_conv1(x)))
        y = self.res_bn2(self.res_conv2(y))
        x = self.res_out_relu(x + y)
        x = self.down_relu(self.down_bn(self.down_conv(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the top-1 accuracy of ``model`` on ``(x, y)`` (fraction in ``[0, 1]``)."""
    return float((model(x).argmax(dim=1) == y).float().mean())


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread (bitwise-reproducible CPU training)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_epochs(model: nn.Module, split: DigitsSplit, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    n = len(split.y_train)
    steps = EPOCHS * ((n + BATCH_SIZE - 1) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(split.x_train[batch]), split.y_train[batch])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_digits_cnn(seed: int = 0) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the train split, deterministically.

    Training runs single-threaded with fixed seeds (weights init and batch
    order), so the same ``seed`` gives bitwise-identical weights on a given
    platform. Takes a few seconds on one CPU core.

    Args:
        seed: Seed for weight initialisation and shuffling.

    Returns:
        The trained model in eval mode.
    """
    split = load_digits_split()
    start = time.perf_counter()
    with _single_thread():
        torch.manual_seed(seed)
        model = DigitsCNN()
        _train_epochs(model, split, seed)
        acc = accuracy(model, split.x_test, split.y_test)
    elapsed = time.perf_counter() - start
    logger.info(
        "trained DigitsCNN (seed %d) in %.1f s: test accuracy %.2f %%", seed, elapsed, 100 * acc
    )
    return model


def _arch_tag() -> str:
    """Short tag that changes whenever the architecture or training recipe changes."""
    hyper = (SPLIT_SEED, SPLIT_FRACTIONS, EPOCHS, BATCH_SIZE, LEARNING_RATE, WEIGHT_DECAY)
    recipe = (repr(DigitsCNN()), hyper)
    digest = hashlib.sha256(repr(recipe).encode()).hexdigest()[:10]
    return f"v{ARCH_VERSION}-{digest}"


def digits_cache_path(seed: int = 0) -> Path:
    """Return the cache file used by :func:`load_digits_cnn` for ``seed``."""
    return user_cache_dir() / f"digits_cnn-{_arch_tag()}-seed{seed}.pt"


def _load_cached(path: Path) -> DigitsCNN | None:
    """Return the cached model, ``None`` if absent; warn and return ``None`` if unreadable."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsCNN()
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache means "retrain"
        logger.warning("digits CNN cache %s is unreadable (%s); retraining", path, exc)
        return None
    logger.debug("loaded digits CNN from %s", path)
    return model.eval()


def load_digits_cnn(seed: int = 0) -> DigitsCNN:
    """Return the trained :class:`DigitsCNN` in eval mode, training it on first use.

    The state dict is cached in :func:`digits_cache_path` (under
    ``$LOWBIT_CACHE_DIR``, ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit``).
    A corrupt cache file is replaced by a retrained model. If the cache cannot
    be written, a warning is logged and the freshly trained model is returned.

    Args:
        seed: Training seed (part of the cache file name).

    Returns:
        The model, in eval mode.
    """
    path = digits_cache_path(seed)
    model = _load_cached(path)
    if model is not None:
        return model
    model = train_digits_cnn(seed)
    try:
        save_atomic(model.state_dict(), path)
    except OSError as exc:
        logger.warning("could not write digits CNN cache %s: %s", path, exc)
    return model
