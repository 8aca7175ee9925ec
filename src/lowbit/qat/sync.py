"""Keeping QAT state identical on every rank of a ``torch.distributed`` group (gloo on CPU, NCCL on CUDA).

Under ``DistributedDataParallel`` the parameters (weights, learnable scales and offsets) stay identical
because their gradients are averaged. What DDP does not cover is synchronised here, inside the forward pass
of training steps (every rank runs the same layers in the same order, so the collectives pair up):

* activation observers: the batch min / max is all-reduced (MIN / MAX) before the EMA update, so every
  rank's EMA equals the EMA of the global batch;
* simulated BatchNorm: batch mean and variance are computed over the global batch from all-reduced sums
  ``Σy``, ``Σy²`` and counts (differentiable, as ``SyncBatchNorm``), so running statistics agree too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowbit.data import rank_and_world
from lowbit.device import model_device


def world_size() -> int:
    """Size of the default process group (1 without one)."""
    return rank_and_world()[1]


class _AllReduceSum(torch.autograd.Function):
    """``Σ_ranks x`` with gradient ``Σ_ranks ∂L/∂y`` (every rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        y = x.detach().clone().contiguous()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        g = grad.detach().clone().contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_extrema(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise global ``(min lo, max hi)`` over the ranks (the inputs unchanged with one rank)."""
    if world_size() == 1:
        return lo, hi
    lo, hi = lo.detach().clone().contiguous(), hi.detach().clone().contiguous()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


def _update_running(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                    n: torch.Tensor) -> None:
    """BatchNorm's running-statistics update (unbiased variance), as ``F.batch_norm`` does it."""
    if not _tracks(bn):
        return
    with torch.no_grad():
        momentum = _momentum(bn)
        unbiased = var * (n / (n - 1.0).clamp(min=1.0))  # n stays a tensor: no wait for the device
        bn.running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
        bn.running_var.mul_(1 - momentum).add_(unbiased.detach() * momentum)


def batch_norm_train(y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """BatchNorm of ``y`` (channels on dim 1) with batch statistics, updating ``bn``'s running statistics.

    One rank: ``bn(y)`` in training mode. Several ranks: the statistics of the global batch,

        mean = Σy / n,   var = Σy² / n − mean²,   ŷ = (y − mean) / sqrt(var + ε) · γ + β

    with the sums and ``n`` all-reduced (gradients flow through the all-reduce).
    """
    if world_size() == 1:
        if not _tracks(bn):
            return F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, _momentum(bn), bn.eps)
    dims = [0] + list(range(2, y.ndim))
    c = y.shape[1]
    count = torch.full((1,), float(y.numel() // c), dtype=y.dtype, device=y.device)
    stats = _AllReduceSum.apply(torch.cat([y.sum(dims), (y * y).sum(dims), count]))
    n = stats[-1].detach()
    mean = stats[:c] / n
    var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
    _update_running(bn, mean, var, n)
    shape = [1, c] + [1] * (y.ndim - 2)
    out = (y - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return out


def _tracks(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.track_running_stats and bn.running_mean is not None


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The momentum ``bn.forward`` would use this step (counting the step as ``bn`` itself does)."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel`` set up for QAT (returns ``model`` itself with one rank).

    ``find_unused_parameters`` while some learnable range still waits for its observer phase to end (it gets
    no gradient until then; DDP leaves its ``.grad`` as ``None``). ``forward_sync_buffers=False``: quantizer
    and BatchNorm buffers are kept identical by the synchronisation above, not overwritten by rank 0's at
    every step.
    """
    if world_size() == 1:
        return model
    waiting = any(getattr(m, "learn_scale", None) is not None and getattr(m, "ranges_ready", True) is False
                  for m in model.modules())
    device = model_device(model)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=waiting,
                                               forward_sync_buffers=False)
