"""``calibrate``: stream data through a prepared model so every quantizer's observer sees it.

Data is fed as :mod:`lowbit.data` describes: any iterable of batches, one Tensor of inputs, or a
``forward_loop(model)`` callable.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lowbit.data import Data, iter_batches, num_batches, run_batch  # noqa: F401 (Data re-exported)
from lowbit.progress import progress_steps
from lowbit.transforms.prepare import start_calibration_

log = logging.getLogger(__name__)


def calibrate(model: nn.Module, data: Data, batch_size: int = 32, show_progress: bool = True) -> nn.Module:
    """Gather statistics in every quantizer of a prepared model (in float; nothing is quantized yet).

    Args:
        model: a model returned by ``prepare_``.
        data: iterable of batches, a Tensor of inputs, or ``forward_loop(model)``.
        batch_size: batch size when ``data`` is one Tensor.
        show_progress: report progress per batch (``lowbit.progress``: the command line draws a bar).

    Returns:
        ``model``, with quantizers calibrating; call ``convert_`` to freeze them.
    """
    start_calibration_(model)
    model.eval()
    with torch.no_grad():
        if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
            data(model)
            return model
        n = 0
        batches = iter_batches(data, batch_size)
        for batch in progress_steps(batches, "calibrating", num_batches(data, batch_size), enabled=show_progress):
            run_batch(model, batch)
            n += 1
    if n == 0:
        raise ValueError("calibration data is empty: no batch was seen")
    log.info("calibrated on %d batches", n)
    return model
