"""Feeding data to a model: the one convention every job uses (calibration, passes, QAT, analysis, search).

Data enters as any iterable of batches or as a ``forward_loop(model)`` callable; lowbit never owns a
DataLoader. A batch that is a Tensor is passed as ``model(batch)``; a tuple/list as ``model(batch[0])``
(the usual ``(inputs, labels)`` pair); a dict as ``model(**batch)``. A single Tensor holding the whole set
is cut into batches of ``batch_size`` along dim 0. Every batch is moved to the model's device as it is fed
(:func:`lowbit.device.to_device`), so data may stay on the CPU (or be memory-mapped) while the model runs on
CUDA.

>>> import torch
>>> [b.shape[0] for b in iter_batches(torch.zeros(5, 2), batch_size=2)]
[2, 2, 1]
>>> run_batch(lambda x: x.sum().item(), (torch.ones(3), "label"))
3.0
>>> rank_and_world()  # no process group: one process
(0, 1)
"""

from __future__ import annotations

import copy
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowbit.device import model_device, to_device

Data = Iterable[Any] | Callable[[nn.Module], Any] | torch.Tensor


def iter_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 32) -> Iterator[Any]:
    """Batches of ``data``; a single Tensor is split along dim 0."""
    if isinstance(data, torch.Tensor):
        if data.ndim > 0 and data.shape[0] == 0:
            return  # torch.split would yield one empty batch; no batch lets calibrate report empty data
        yield from torch.split(data, batch_size)
    elif isinstance(data, StreamedInputs) and data.batch_size != batch_size:
        view = copy.copy(data)  # the caller's batch size, still read by the DataLoader's workers
        view.batch_size = batch_size
        yield from view
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
    """Call ``model`` on one batch following the conventions in the module docstring; the batch's tensors
    move to the device of an ``nn.Module`` model first."""
    if isinstance(model, nn.Module):
        batch = to_device(batch, model_device(model))
    args, kwargs = batch_args(batch)
    return model(*args, **kwargs)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group (whose share of the batches this process feeds);
    ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StreamedInputs:
    """A set of inputs ``[N, ...]`` read on demand, never held whole in memory (a memory-mapped ``.npy``, a
    folder of images). Subclasses implement :meth:`load` (the samples at some indices, as one float Tensor).

    It behaves enough like a Tensor of inputs for every job: ``len``, ``shape``, ``x[a:b]`` (a lazy view),
    ``x[indices]`` (those samples, loaded), and iteration yields batches of ``batch_size`` samples, read by a
    ``torch.utils.data.DataLoader`` with ``workers`` worker processes (pinned memory when CUDA is available,
    so the copies to the GPU overlap the reading).

    Args:
        n: number of samples.
        sample_shape: shape of one sample.
        batch_size: samples per batch when iterated.
        workers: DataLoader worker processes (0: read in this process).
    """

    def __init__(self, n: int, sample_shape: tuple[int, ...], batch_size: int = 32, workers: int = 0) -> None:
        if workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        self.indices = range(n)
        self.sample_shape = tuple(sample_shape)
        self.batch_size = batch_size
        self.workers = workers

    def load(self, indices: list[int]) -> torch.Tensor:
        """The samples at ``indices`` (positions in the whole set), stacked ``[len(indices), ...]`` float32."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.indices), *self.sample_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            view = copy.copy(self)
            view.indices = self.indices[key]
            return view
        if isinstance(key, numbers.Integral):
            return self.load([self.indices[int(key)]])[0]
        keys = key.tolist() if isinstance(key, torch.Tensor) else list(key)
        return self.load([self.indices[int(k)] for k in keys])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start .. stop - 1`` of this view, loaded."""
        return self.load(list(self.indices[start:stop]))

    def materialize(self) -> torch.Tensor:
        """The whole view as one Tensor (for the steps that need random access to every sample)."""
        return torch.cat([b for b in self]) if len(self) else torch.empty(0, *self.sample_shape)

    def __iter__(self) -> Iterator[torch.Tensor]:
        starts = list(range(0, len(self), self.batch_size))
        loader = torch.utils.data.DataLoader(
            _Batches(self, starts), batch_size=None, num_workers=self.workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            # not fork: a process that already runs threads (JAX from the LiteRT target, CUDA) can deadlock in a
            # forked child; the inputs pickle by path (``NpyInputs`` re-opens its map)
            multiprocessing_context="forkserver" if self.workers and sys.platform == "linux" else None)
        yield from loader


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of a :class:`StreamedInputs` (what a DataLoader worker reads)."""

    def __init__(self, inputs: StreamedInputs, starts: list[int]) -> None:
        self.inputs, self.starts = inputs, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.starts[i]
        return self.inputs.rows(start, start + self.inputs.batch_size)


def as_tensor(data: Any) -> Any:
    """``data`` read whole into one Tensor when it is :class:`StreamedInputs` (for the few steps that need every
    sample at once, e.g. the mixed-precision search); anything else unchanged."""
    return data.materialize() if isinstance(data, StreamedInputs) else data


def num_batches(data: Any, batch_size: int) -> int | None:
    """How many batches :func:`iter_batches` yields for ``data`` (None when it cannot tell)."""
    if isinstance(data, (torch.Tensor, StreamedInputs)):
        return -(-len(data) // batch_size) if data.ndim > 0 else None
    try:
        return len(data)
    except TypeError:
        return None
