"""``calibrate``: stream data through a prepared model so every quantizer's observer sees it.

Data enters as any iterable of batches or as a ``forward_loop(model)`` callable; lowbit never owns a
DataLoader. A batch that is a Tensor is passed as ``model(batch)``; a tuple/list as ``model(batch[0])``
(the usual ``(inputs, labels)`` pair); a dict as ``model(**batch)``. A single Tensor holding the whole set
is cut into batches of ``batch_size`` along dim 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from lowbit.transforms.prepare import start_calibration_

log = logging.getLogger(__name__)

Data = Iterable[Any] | Callable[[nn.Module], Any] | torch.Tensor


def iter_batches(data: Iterable[Any] | torch.Tensor, batch_size: int = 32) -> Iterator[Any]:
    """Batches of ``data``; a single Tensor is split along dim 0."""
    if isinstance(data, torch.Tensor):
        if data.ndim > 0 and data.shape[0] == 0:
            return  # torch.split would yield one empty batch; no batch lets calibrate report empty data
        yield from torch.split(data, batch_size)
    else:
        yield from data


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one batch following the conventions in the module docstring."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; pass a forward_loop callable")


def _total(data: Any, batch_size: int) -> int | None:
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def calibrate(model: nn.Module, data: Data, batch_size: int = 32, show_progress: bool = True) -> nn.Module:
    """Gather statistics in every quantizer of a prepared model (in float; nothing is quantized yet).

    Args:
        model: a model returned by ``prepare_``.
        data: iterable of batches, a Tensor of inputs, or ``forward_loop(model)``.
        batch_size: batch size when ``data`` is one Tensor.
        show_progress: draw a rich progress bar.

    Returns:
        ``model``, with quantizers calibrating; call ``convert_`` to freeze them.
    """
    start_calibration_(model)
    model.eval()
    with torch.no_grad():
        if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
            data(model)
            return model
        columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True, disable=not show_progress) as progress:
            task = progress.add_task("calibrate", total=_total(data, batch_size))
            n = 0
            for batch in iter_batches(data, batch_size):
                run_batch(model, batch)
                n += 1
                progress.advance(task)
    if n == 0:
        raise ValueError("calibration data is empty: no batch was seen")
    log.info("calibrated on %d batches", n)
    return model
