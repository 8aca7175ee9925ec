"""Calibration sharded across processes (``torch.distributed``; gloo on CPU).

Every rank feeds its shard of the calibration batches into its own observers; then the observer states
(``Observer.state()``) are gathered with ``all_gather_object`` and merged *in rank order* on every rank, so
every rank ends with the statistics of one observer fed the whole stream:

    batches b_1 .. b_n  →  rank r gets the contiguous run b_(⌊r·n/W⌋+1) .. b_(⌊(r+1)·n/W⌋)
    merged = state_0 ⊕ state_1 ⊕ … ⊕ state_(W−1)      (⊕ = ``Observer.merge``, "then the other's stream")

so the merged stream is b_1 .. b_n in the single-process order. Min-max and the histogram calibrators
(percentile, entropy, mse) merge exactly: the qparams are bit-identical to one process calibrating on all
batches. The EMA and mean/std observers depend on the order of the stream; merging in rank order with
contiguous shards reproduces the single-process order, and their closed-form merge (float64) agrees with
the sequential float32 stream to rounding (≈1e-6 relative), not bit for bit.

Weight quantizers observe their (identical) weight once when calibration starts and once per batch; ranks
other than 0 forget that first observation before their shard, so the merged count of observations equals
the single process's too.

The process group comes from the torchrun environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``); see :func:`init_from_env`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowbit.nn import QuantState, TensorQuantizer
from lowbit.data import Data, StreamedInputs, iter_batches, rank_and_world, run_batch
from lowbit.ptq.calibrate import calibrate

log = logging.getLogger(__name__)

ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
DEFAULT_TIMEOUT_S = 1800


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def init_from_env(backend: str = "gloo", timeout_s: float | None = None) -> bool:
    """Join the process group described by the torchrun environment variables.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, or a group is already initialised.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but one of ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` is missing.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is {env_world_size()} but environment variable {missing[0]} is not set")
    timeout = _dt.timedelta(seconds=float(timeout_s or os.environ.get("LOWBIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shard(items: list[Any], rank: int, world: int) -> list[Any]:
    """The contiguous run of ``items`` that ``rank`` of ``world`` processes: ``items[⌊r·n/W⌋ : ⌊(r+1)·n/W⌋]``."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def _calibrating(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.state is QuantState.CALIBRATING and m.observer is not None]


def merge_observers_(model: nn.Module) -> int:
    """All-gather every calibrating quantizer's observer state and merge them in rank order on every rank.

    Returns:
        the number of observers merged (0 without a process group of more than one rank).
    """
    rank, world = rank_and_world()
    if world == 1:
        return 0
    local = {name: q.observer.state() for name, q in _calibrating(model)}
    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, local)
    for name, q in _calibrating(model):
        states = [g.get(name) if g else None for g in gathered]
        if any(s is None for s in states):
            raise RuntimeError(f"quantizer {name} is calibrating on rank {rank} but not on every rank")
        q.observer.load_state(states[0])
        for state in states[1:]:
            q.observer.merge(state)
    return len(local)


def _batch_list(data: Data, batch_size: int) -> list[Any]:
    """The batches to shard; streamed inputs give one loader per batch, read only by the rank that runs it."""
    if isinstance(data, StreamedInputs):
        return [functools.partial(data.rows, start, start + batch_size) for start in range(0, len(data), batch_size)]
    return list(iter_batches(data, batch_size))


def sharded_forward_loop(data: Data, batch_size: int = 32) -> Callable[[nn.Module], None]:
    """A ``forward_loop(model)`` for :func:`lowbit.calibrate` that runs this rank's shard, then merges.

    Without a process group (or with one rank) it runs every batch, like ``calibrate(model, data)``.
    """
    if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
        raise TypeError("sharded calibration needs batches (a Tensor or an iterable), not a forward_loop callable")
    batches = _batch_list(data, batch_size)
    if not batches:
        raise ValueError("calibration data is empty: no batch was seen")

    def forward_loop(model: nn.Module) -> None:
        rank, world = rank_and_world()
        mine = shard(batches, rank, world)
        if rank > 0:
            for _, q in _calibrating(model):
                q.observer.reset()  # the single process observed each weight once before the batches, not W times
        for batch in mine:
            run_batch(model, batch() if callable(batch) else batch)
        merged = merge_observers_(model)
        log.info("rank %d calibrated on %d of %d batches; merged %d observers", rank, len(mine), len(batches), merged)

    forward_loop.sharded = True  # every rank must run it: it ends in a collective
    return forward_loop


def calibrate_sharded(model: nn.Module, data: Data, batch_size: int = 32) -> nn.Module:
    """:func:`lowbit.calibrate` with the batches sharded across the ranks of the process group.

    Every rank must call it with the same ``data``; all end with the same observer statistics (see module
    docstring for which calibrators are bit-exact).
    """
    return calibrate(model, sharded_forward_loop(data, batch_size), show_progress=False)
