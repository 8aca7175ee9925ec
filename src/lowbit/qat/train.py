"""A compact QAT training loop for data held in tensors (what the CLI and the benchmark run).

Users with their own loop need only ``prepare_qat_``, ``param_groups``, ``ThreePhaseSchedule`` and
``convert_``; this loop adds what QAT runs usually repeat: AdamW without weight decay on ranges, norms and
biases, the seed's three-phase schedule, labels (cross-entropy) or distillation from the FP32 teacher, one
metric per epoch, checkpoints that resume exactly, and ``DistributedDataParallel`` when a process group
exists.

Batches. Epoch ``e`` shuffles the N samples with a generator seeded ``seed · 1_000_003 + e`` and cuts the
permutation into global batches of ``batch_size`` (a last batch smaller than the world size is dropped);
with W ranks each global batch is split into W contiguous parts and rank r trains on part r, so DDP's
gradient average is the gradient of the global batch (up to part sizes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowbit.data import iter_batches, rank_and_world
from lowbit.device import model_device
from lowbit.progress import progress_steps
from lowbit.qat.distill import distill_loss
from lowbit.qat.schedule import ThreePhaseSchedule
from lowbit.qat.sync import wrap_ddp

log = logging.getLogger(__name__)

SCHEDULES = ("three_phase", "constant")
NO_DECAY_SUFFIXES = ("learn_scale", "learn_offset")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_qat`.

    Attributes:
        epochs: passes over the training inputs.
        batch_size: global batch size (split across ranks).
        lr: base learning rate of AdamW (the schedule multiplies it).
        weight_decay: AdamW decay of weights (ranges, norms and biases get none).
        distill: ``None`` (cross-entropy on labels), ``"kl"`` (logits) or ``"mse"`` (embeddings) against the
            FP32 teacher.
        temperature: distillation temperature (``kl``).
        schedule: ``three_phase`` (:class:`ThreePhaseSchedule`) or ``constant``.
        seed: shuffling seed.
    """

    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    distill: str | None = None
    temperature: float = 1.0
    schedule: str = "three_phase"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not float(self.lr) > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not float(self.weight_decay) >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.distill is not None:
            distill_loss(self.distill)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class EpochLog:
    """One line of the training log."""

    epoch: int
    loss: float
    lr: float
    metric: float | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainState:
    """Everything needed to continue training: optimizer, schedule, epochs done and their log."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epochs_done: int = 0
    log: list[EpochLog] = field(default_factory=list)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights with ``weight_decay``; ranges (``learn_scale`` / ``learn_offset``), norms and
    biases (every parameter of ≤ 1 dimension) without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Sample indices of this rank for every step of ``epoch`` (see module docstring)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [part.tensor_split(world)[rank] for part in order.split(batch_size) if len(part) >= world]


def make_train_state(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> TrainState:
    """AdamW over :func:`param_groups` and the configured schedule over ``epochs · steps_per_epoch`` steps."""
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    total = max(config.epochs * steps_per_epoch, 1)
    factor = ThreePhaseSchedule(total) if config.schedule == "three_phase" else (lambda step: 1.0)
    return TrainState(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))


def _targets(teacher: nn.Module | None, inputs: torch.Tensor, labels: torch.Tensor | None,
             config: TrainConfig) -> torch.Tensor:
    if config.distill is None:
        if labels is None:
            raise ValueError("training without labels needs distillation (distill='kl' or 'mse') and a teacher")
        return labels
    if teacher is None:
        raise ValueError(f"distill={config.distill!r} needs the FP32 teacher model")
    teacher.eval()
    device = model_device(teacher)
    with torch.no_grad():
        return torch.cat([teacher(chunk.to(device)) for chunk in iter_batches(inputs, 64)])


def _sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Sum over the ranks, on ``device`` (NCCL reduces CUDA tensors only)."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _run_epoch(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state: TrainState,
               config: TrainConfig, epoch: int) -> float:
    """One epoch; batches move to the model's device as they are drawn, the loss is summed there (one
    device-to-host copy per epoch, not per step)."""
    rank, world = rank_and_world()
    device = model_device(net)
    loss_fn = F.cross_entropy if config.distill is None else distill_loss(config.distill)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    net.train()
    batches = epoch_batches(len(inputs), config.batch_size, config.seed, epoch, rank, world)
    for idx in progress_steps(batches, f"QAT epoch {epoch + 1}/{config.epochs}"):
        x, y = inputs[idx].to(device, non_blocking=True), targets[idx].to(device, non_blocking=True)
        out = net(x)
        loss = loss_fn(out, y) if config.distill is None else loss_fn(out, y, config.temperature)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        total += loss.detach().double() * len(idx)
        count += len(idx)
    total, count = _sum_across_ranks([float(total), float(count)], device)
    return total / max(count, 1.0)


def train_qat(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    config: TrainConfig = TrainConfig(),
    evaluate: Callable[[nn.Module], float] | None = None,
    state: TrainState | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train a ``prepare_qat_`` model for ``config.epochs`` epochs (or the remaining ones of ``state``).

    Args:
        inputs: training inputs ``[N, ...]``; ``labels`` ``[N]`` for cross-entropy, or a ``teacher`` with
            ``config.distill`` (its outputs on ``inputs`` are computed once, in eval mode).
        evaluate: ``evaluate(model) -> float`` called after every epoch (rank 0 only, model in eval mode).
        state: a :class:`TrainState` to continue (e.g. from :func:`load_checkpoint`).
        on_epoch_end: called with the state after every epoch (e.g. to save a checkpoint).

    Returns:
        the final :class:`TrainState` (its ``log`` has one :class:`EpochLog` per epoch).
    """
    rank, world = rank_and_world()
    targets = _targets(teacher, inputs, labels, config)
    steps = len(epoch_batches(len(inputs), config.batch_size, config.seed, 0, rank, world))
    if steps == 0:
        raise ValueError(f"{len(inputs)} training samples give no batch for {world} processes")
    state = state or make_train_state(model, config, steps)
    net = wrap_ddp(model)
    for epoch in range(state.epochs_done, config.epochs):
        t0 = time.perf_counter()
        loss = _run_epoch(net, inputs, targets, state, config, epoch)
        metric = None
        if evaluate is not None and rank == 0:
            model.eval()
            metric = float(evaluate(model))
            model.train()
        state.epochs_done = epoch + 1
        state.log.append(EpochLog(epoch + 1, loss, state.optimizer.param_groups[0]["lr"], metric,
                                  time.perf_counter() - t0))
        log.info("QAT epoch %d/%d: loss %.4f, metric %s", epoch + 1, config.epochs, loss, metric)
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state


def save_checkpoint(path: str | Path, model: nn.Module, state: TrainState | None = None, **meta) -> Path:
    """Write the QAT model's ``state_dict`` (every quantizer's state included), the optimizer and schedule
    state, the epochs done and their log, atomically. Load with :func:`load_checkpoint`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    payload = {"model": model.state_dict(), "meta": dict(meta)}
    if state is not None:
        payload.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                       epochs_done=state.epochs_done, log=[e.to_dict() for e in state.log])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module, state: TrainState | None = None) -> dict:
    """Restore a :func:`save_checkpoint` file into ``model`` (prepared the same way) and ``state`` (made by
    :func:`make_train_state` with the same config); returns the saved ``meta``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    if state is not None:
        if "optimizer" not in payload:
            raise ValueError(f"checkpoint {path} has no optimizer state to resume from")
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        state.epochs_done = int(payload["epochs_done"])
        state.log = [EpochLog(**e) for e in payload["log"]]
    return payload["meta"]
