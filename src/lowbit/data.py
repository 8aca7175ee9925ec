"""Feeding data to a model: the one convention every job uses (calibration, passes, QAT, analysis, search).

Data enters as any iterable of batches or as a ``forward_loop(model)`` callable; lowbit never owns a
DataLoader. A batch that is a Tensor is passed as ``model(batch)``; a tuple/list as ``model(batch[0])``
(the usual ``(inputs, labels)`` pair); a dict as ``model(**batch)``. A single Tensor holding the whole set
is cut into batches of ``batch_size`` along dim 0.

>>> import torch
>>> [b.shape[0] for b in iter_batches(torch.zeros(5, 2), batch_size=2)]
[2, 2, 1]
>>> run_batch(lambda x: x.sum().item(), (torch.ones(3), "label"))
3.0
>>> rank_and_world()  # no process group: one process
(0, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Data = Iterable[Any] | Callable[[nn.Module], Any] | torch.Tensor


def iter_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 32) -> Iterator[Any]:
    """Batches of ``data``; a single Tensor is split along dim 0."""
    if isinstance(data, torch.Tensor):
        if data.ndim > 0 and data.shape[0] == 0:
            return  # torch.split would yield one empty batch; no batch lets calibrate report empty data
        yield from torch.split(data, batch_size)
    else:
        yield from data


def batch_args(batch: Any) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` a batch is fed with (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return (batch[0],), {}
    if isinstance(batch, dict):
        return (), batch
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass a forward_loop callable")


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch following the conventions in the module docstring."""
    args, kwargs = batch_args(batch)
    return model(*args, **kwargs)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group (whose share of the batches this process feeds);
    ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
