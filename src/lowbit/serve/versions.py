"""Housekeeping of ``DIR/versions``: a bounded number of versions, no stale staging folders, a record of every try.

* A rejected (or failed) re-calibration's folder is removed; its ``recalibration.json`` record is appended to
  ``DIR/versions/recalibrations.jsonl`` (one JSON object a line), so the history stays without the 20+ MB
  models.
* At most ``keep`` version folders stay in ``DIR/versions`` (always the active one, then the newest);
  ``v1`` is ``DIR`` itself and is never removed.
* Staging folders (``.vN.tmp-PID-*``) of re-calibrations whose process died are removed when a server starts
  and when a re-calibration starts.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from lowbit.outdir import remove_stale_staging
from lowbit.serve.models import _VERSION, active_version

log = logging.getLogger(__name__)

HISTORY = "recalibrations.jsonl"
_STAGED = re.compile(r"^\.(v\d+)\.(?:tmp|old)-")


def clean_stale_versions(model_dir: Path) -> list[Path]:
    """Remove staging folders of dead re-calibrations in ``DIR/versions``; the removed paths."""
    folder = Path(model_dir) / "versions"
    if not folder.is_dir():
        return []
    names = {m.group(1) for p in folder.iterdir() if (m := _STAGED.match(p.name))}
    removed: list[Path] = []
    for name in sorted(names):
        removed += remove_stale_staging(folder, name)
    return removed


def append_history(model_dir: Path, record: dict) -> None:
    """Append ``record`` as one line to ``DIR/versions/recalibrations.jsonl``."""
    path = Path(model_dir) / "versions" / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str, allow_nan=True) + "\n")


def remove_version(model_dir: Path, version: str) -> None:
    """Delete ``DIR/versions/<version>`` (never ``v1``, never the active version)."""
    if version == "v1" or version == active_version(model_dir):
        raise ValueError(f"{model_dir}: version {version} is the original or the active one; it stays")
    shutil.rmtree(Path(model_dir) / "versions" / version, ignore_errors=True)


def prune_versions(model_dir: Path, keep: int) -> list[str]:
    """Keep at most ``keep`` folders in ``DIR/versions``: the active one and the newest others; the ones removed."""
    if keep < 1:
        raise ValueError(f"--keep-versions {keep}: must be >= 1")
    folder = Path(model_dir) / "versions"
    if not folder.is_dir():
        return []
    versions = sorted((int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))),
                      reverse=True)
    active = active_version(model_dir)
    others = [f"v{n}" for n in versions if f"v{n}" != active]
    removed = others[keep - 1:] if active in {f"v{n}" for n in versions} else others[keep:]
    for version in removed:
        shutil.rmtree(folder / version, ignore_errors=True)
    if removed:
        log.warning("removed old model versions %s of %s (--keep-versions %d)", ", ".join(removed), model_dir, keep)
    return removed
