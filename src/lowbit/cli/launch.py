"""``--nproc N``: run a ``lowbit`` command in N local worker processes, torchrun-style.

``lowbit quantize ... --nproc N`` (or ``qat``) starts N copies of the same command with the environment
torchrun would give them (``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``, ``WORLD_SIZE=N``,
``RANK`` = ``LOCAL_RANK`` = 0..N−1, ``LOCAL_WORLD_SIZE=N``) and waits for them. A process that finds
``WORLD_SIZE`` already set (started by us, or by ``torchrun`` on one or several machines) joins the process
group instead (gloo on CPU, NCCL with ``--device cuda``, each rank on ``cuda:LOCAL_RANK``), so the same command line scales out unchanged::

    torchrun --nnodes 2 --nproc-per-node 4 ... -m lowbit.cli.main qat --model ... --out DIR

Rank 0 writes the outputs; the other ranks only compute. If one worker fails, the others are stopped, a
staging folder left behind is removed, and the failing worker's exit code is returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
from torch import nn

from lowbit.outdir import check_output_dir
from lowbit.data import Data
from lowbit.ptq.distributed import env_world_size, init_from_env, rank_and_world, sharded_forward_loop
from lowbit.ptq.passes import quantize

log = logging.getLogger(__name__)

GRACE_S = 15.0


def in_worker() -> bool:
    """True when this process belongs to a launched group (``WORLD_SIZE`` set by us or torchrun)."""
    return "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, base: dict | None = None) -> dict[str, str]:
    """The torchrun-compatible environment of local worker ``rank``."""
    env = dict(os.environ if base is None else base)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + GRACE_S
    for p in procs:  # the others usually fail on their own once a peer is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn_workers(argv: list[str], nproc: int, out_dir: Path | None = None) -> int:
    """Run ``python -m lowbit.cli.main *argv`` as ``nproc`` workers; the first non-zero exit code, else 0."""
    port = free_port()
    started = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "lowbit.cli.main", *argv], env=worker_env(r, nproc, port))
             for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs)
                _remove_staging(out_dir, started)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    except BaseException:
        for p in procs:
            p.kill()
        _remove_staging(out_dir, started)
        raise


def _remove_staging(out_dir: Path | None, since: float) -> None:
    """Staging folders of a killed writer (``.DIR.tmp-*`` beside ``DIR``, created by this launch)."""
    if out_dir is None or not out_dir.parent.is_dir():
        return
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if path.stat().st_mtime >= since - 1:
            shutil.rmtree(path, ignore_errors=True)


def maybe_launch(args, argv: list[str]) -> int | None:
    """Spawn workers for ``--nproc N`` > 1 (returns their exit code), or None to run in this process."""
    nproc = getattr(args, "nproc", None) or 1
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1 or in_worker():
        if in_worker() and nproc > 1 and env_world_size() != nproc:
            log.warning("--nproc %d ignored: this process belongs to a group of WORLD_SIZE=%d", nproc, env_world_size())
        return None
    out = getattr(args, "out", None)
    if out is not None:
        check_output_dir(Path(out), getattr(args, "force", False))  # refuse before starting anything
    return spawn_workers(argv, nproc, Path(out) if out is not None else None)


@contextlib.contextmanager
def process_group(backend: str = "gloo") -> Iterator[tuple[int, int]]:
    """Join the environment's process group for the block (no-op in a single process); yields (rank, world).

    Args:
        backend: ``gloo`` (CPU) or ``nccl`` (CUDA; ``lowbit.device.process_group_backend`` picks it).
    """
    joined = init_from_env(backend)
    try:
        yield rank_and_world()
        if joined:  # leave together: a rank tearing gloo down while another still uses it can abort the process
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


def is_writer_env() -> bool:
    """True on the process that will write (``RANK`` 0 or unset); readable before the group is joined."""
    return os.environ.get("RANK", "0") == "0"


def is_writer() -> bool:
    """True on the rank that writes outputs and prints (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def shard_calibration(calib: Data, recipe=None, batch_size: int = 32) -> Data:
    """Calibration data sharded across the group's ranks (unchanged in a single process).

    A recipe with post-training passes keeps the whole data on every rank: the passes need every batch (they
    capture layer inputs), so each rank computes the same result as one process would.
    """
    if rank_and_world()[1] == 1:
        return calib
    if recipe is not None and getattr(recipe, "passes", ()):
        log.warning("post-training passes %s need every calibration batch: calibration is not sharded",
                    ", ".join(recipe.passes))
        return calib
    return sharded_forward_loop(calib, batch_size)


def follow_quantize(model: nn.Module, example_input, calib: Data, recipe, device=None) -> int:
    """What a non-writing rank does for ``quantize``: take part in the sharded calibration on ``device``, write
    nothing (nothing at all when the calibration is not sharded)."""
    if getattr(calib, "sharded", False):
        quantize(model, calib, recipe, example_input, show_progress=False, device=device)
    return 0
