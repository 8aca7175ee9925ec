"""Location of, and atomic writes into, lowbit's per-user cache directory."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["save_atomic", "user_cache_dir"]


def user_cache_dir() -> Path:
    """Return lowbit's cache directory (not created).

    Resolution order: ``$LOWBIT_CACHE_DIR``; else ``$XDG_CACHE_HOME/lowbit``;
    else ``~/.cache/lowbit``. Empty variables count as unset.

    Returns:
        The directory path.
    """
    explicit = os.environ.get("LOWBIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lowbit"
    return Path.home() / ".cache" / "lowbit"


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    The object is written to a temporary file in the same directory, flushed
    to disk and moved over ``path`` with ``os.replace``, so readers see either
    the old file or the complete new one, never a partial write.

    Args:
        obj: Anything ``torch.save`` accepts (typically a state dict).
        path: Destination file; its parent directory is created if needed.

    Raises:
        OSError: If the directory or file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", path)
