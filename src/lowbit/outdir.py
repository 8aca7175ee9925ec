"""Writing an output folder safely: one writer at a time, staged, renamed into place, with the user's umask.

    with staged_output(out_dir, force) as staging:
        ... write files into staging ...
    # now out_dir holds them (an existing out_dir was replaced only with force=True)

* **Lock.** ``.DIR.lock`` beside ``DIR`` is locked (``flock``) for the whole run. A second writer fails at once
  with :class:`OutputLockedError` naming the holder; with ``force`` it waits for the first one to finish (up to
  ``wait_s``), then replaces its result: two runs never interleave and never both report success on one folder
  unless ``--force`` asked for the replacement. The kernel drops the lock when its process dies (even ``kill -9``).
* **Staging.** Files go into ``.DIR.tmp-PID-XXXX`` beside ``DIR``, renamed over ``DIR`` at the end; on any
  exception (``KeyboardInterrupt`` and the CLI's SIGTERM included) the staging folder is removed. Staging
  folders of dead processes (``kill -9``, power loss) are removed when the next writer of ``DIR`` starts.
* **Permissions.** ``mkdtemp`` creates folders 0700 and some writers create files 0600; before the rename every
  folder becomes ``0777 & ~umask`` and every file ``0666 & ~umask``, like any file the user creates.
* **Paths.** An output below a regular file, or in a folder the user cannot write, is refused up front with
  :class:`OutputPathError` (a one-line CLI error, exit 2) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_WAIT_S = 3600.0
_STAGING_PID = re.compile(r"\.(?:tmp|old)-(\d+)(?:-|$)")


class OutputExistsError(FileExistsError):
    """The output folder exists and ``force`` was not given."""


class OutputLockedError(OutputExistsError):
    """Another process is writing the same output folder."""


class OutputPathError(ValueError):
    """The output path cannot be written (below a regular file, or in a folder without write permission)."""


def current_umask() -> int:
    """The process umask (read without changing it for more than an instant)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(out_dir: Path) -> None:
    """Refuse an output whose nearest existing ancestor is not a writable folder (OutputPathError)."""
    out_dir = Path(out_dir)
    probe = out_dir.parent
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputPathError(f"output {out_dir}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"output {out_dir}: no permission to write in {probe}")


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing, non-empty output folder unless ``force``, and an unwritable output path."""
    out_dir = Path(out_dir)
    check_output_path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise OutputExistsError(f"output {out_dir} already exists; pass --force to replace it")


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists (possibly owned by another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` folders in ``parent`` left by processes that no longer run.

    Call it only while holding the lock of ``NAME``: any live writer of ``NAME`` would hold it instead.
    """
    removed = []
    if not Path(parent).is_dir():
        return removed
    for path in list(Path(parent).glob(f".{glob_escape(name)}.tmp-*")) + list(Path(parent).glob(f".{glob_escape(name)}.old-*")):
        m = _STAGING_PID.search(path.name[len(name) + 1:])
        if m and pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d staging folder(s) of %s left by stopped processes", len(removed), name)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


class DirLock:
    """An exclusive ``flock`` on ``path`` (created if needed, removed on release).

    The lock file is re-checked after locking: if another holder removed it meanwhile (its release), this
    process locked a stale inode and tries again, so two processes can never both hold the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> str:
        """``pid N`` of the current holder as written in the lock file, or ``another process``."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "another process"

    def _try_once(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait_s`` seconds; False when still held by someone else."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self._try_once():
                    return True
            except OSError as exc:
                raise OutputPathError(f"cannot create lock file {self.path}: {exc.strerror or exc}") from None
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _apply_umask(folder: Path) -> None:
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def commit_dir(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` over ``out_dir`` (an existing ``out_dir`` is moved aside first, then removed)."""
    backup = None
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, backup)
    os.replace(staging, out_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()


def lock_output(out_dir: Path, force: bool, wait_s: float = LOCK_WAIT_S) -> DirLock:
    """The held lock of ``out_dir`` (see the module docstring); OutputLockedError when busy and not ``force``."""
    out_dir = Path(out_dir)
    check_output_path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"output {out_dir}: cannot create {out_dir.parent}: {exc.strerror or exc}") from None
    lock = DirLock(out_dir.parent / f".{out_dir.name}.lock")
    if lock.acquire(0.0):
        return lock
    if not force:
        raise OutputLockedError(f"output {out_dir} is being written by {lock.holder()}; wait for it to finish, or "
                                "pass --force to wait and then replace its result")
    log.warning("output %s is being written by %s; waiting (--force)", out_dir, lock.holder())
    if lock.acquire(wait_s):
        return lock
    raise OutputLockedError(f"output {out_dir} is still being written by {lock.holder()} after {wait_s:.0f} s")


@contextlib.contextmanager
def staged_output(out_dir: str | Path, force: bool, wait_s: float = LOCK_WAIT_S) -> Iterator[Path]:
    """Lock ``out_dir``, yield a fresh staging folder beside it, rename it into place if the block succeeds."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    lock = lock_output(out_dir, force, wait_s)
    try:
        check_output_dir(out_dir, force)  # the writer we waited for (or raced) may have written it meanwhile
        remove_stale_staging(out_dir.parent, out_dir.name)
        try:
            staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-{os.getpid()}-"))
        except OSError as exc:
            raise OutputPathError(f"output {out_dir}: cannot write in {out_dir.parent}: "
                                  f"{exc.strerror or exc}") from None
        try:
            yield staging
            _apply_umask(staging)
            commit_dir(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        lock.release()

