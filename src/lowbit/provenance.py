"""What a deployment folder records about where it came from, and the trusted evaluation rows kept with it.

``lowbit quantize`` writes into ``report.json``:

* ``model``: the float model (zoo name or ``module:callable``) that re-calibration rebuilds;
* ``model_sha256``: hash of that model's float weights (:func:`weights_sha256`), checked after the rebuild;
* ``recipe_sha256``: hash of ``recipe.yaml`` (:func:`text_sha256`), checked before a re-calibration uses it.

and ``trusted_inputs.npy`` (with ``trusted_labels.npy`` when the evaluation set has labels): up to
``TRUSTED_MAX_ROWS`` rows (and ``TRUSTED_MAX_BYTES``) of the quantize-time evaluation set. Re-calibration
accepts a new version only if it is at least as good as the served one on these fixed rows, whatever the
fresh rows (which clients control) say.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

TRUSTED_INPUTS, TRUSTED_LABELS = "trusted_inputs.npy", "trusted_labels.npy"
TRUSTED_MAX_ROWS = 512
TRUSTED_MAX_BYTES = 16 * 1024 * 1024
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def text_sha256(text: str) -> str:
    """Hex SHA-256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Hex SHA-256 of every parameter and buffer of ``model`` (names, dtypes, shapes and values, in order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_model_name(name: str) -> None:
    """Refuse a recorded model name that is not a zoo name or ``package.module:callable`` of a non-stdlib module.

    A deployment folder is trusted code (whatever it names is imported and called); this only stops the
    obvious abuse of a tampered ``report.json`` (``os:abort``, ``subprocess:...``, ``builtins:exit``).
    """
    from lowbit import zoo

    if name in zoo.MODEL_NAMES:
        return
    if not _CALLABLE.match(name):
        raise ValueError(f"recorded model {name[:80]!r} is neither a zoo model nor 'package.module:callable'")
    top = name.split(":", 1)[0].split(".", 1)[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ValueError(f"recorded model {name[:80]!r} names a Python standard-library callable, not a model")


def save_trusted_set(folder: Path, eval_set) -> None:
    """Write the first rows of ``eval_set`` (float inputs only) as the deployment's trusted set."""
    x = eval_set.inputs
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        return
    row_bytes = max(1, x[0].numel() * 4)
    n = int(min(x.shape[0], TRUSTED_MAX_ROWS, max(1, TRUSTED_MAX_BYTES // row_bytes)))
    np.save(Path(folder) / TRUSTED_INPUTS, x[:n].detach().cpu().numpy().astype(np.float32))
    labels = eval_set.labels
    if isinstance(labels, torch.Tensor) and labels.shape[:1] == x.shape[:1]:
        np.save(Path(folder) / TRUSTED_LABELS, labels[:n].detach().cpu().numpy().astype(np.int64))


def load_trusted_set(folder: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(inputs, labels or None)`` stored in ``folder``, or None when it has none."""
    path = Path(folder) / TRUSTED_INPUTS
    if not path.is_file():
        return None
    try:
        x = np.load(path, allow_pickle=False)
        labels_path = Path(folder) / TRUSTED_LABELS
        y = np.load(labels_path, allow_pickle=False) if labels_path.is_file() else None
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable trusted set: {str(exc)[:120]}") from None
    if y is not None and y.shape[:1] != x.shape[:1]:
        y = None
    return x.astype(np.float32, copy=False), y
