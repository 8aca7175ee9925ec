"""Where a job runs: resolving ``--device cpu|cuda|auto`` and moving models and batches there.

The device is resolved when a job starts (never at import): ``auto`` is ``cuda`` when CUDA is available, else
``cpu``; ``cuda`` (or ``cuda:N``) without CUDA is a one-line :class:`DeviceError` naming the flag. Every state
lowbit creates (observer statistics, qparams, learnable ranges, capture moments) follows the model's device,
which :func:`model_device` reads from its first parameter or buffer.

>>> resolve_device("cpu")
device(type='cpu')
>>> to_device((torch.zeros(2), "label"), torch.device("cpu"))[1]
'label'
>>> model_device(torch.nn.Linear(2, 2))
device(type='cpu')
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("cpu", "cuda", "auto")


class DeviceError(ValueError):
    """A device the user asked for that this machine cannot provide (the message names the flag)."""


def resolve_device(spec: str | torch.device | None, flag: str = "--device") -> torch.device:
    """``cpu`` / ``cuda[:N]`` / ``auto`` / a ``torch.device`` → a usable ``torch.device``.

    Args:
        spec: what the user asked for; ``None`` means ``cpu``.
        flag: the option named in errors (``--device`` on the command line, ``device=`` in Python).

    Raises:
        DeviceError: CUDA asked for but not available, an unknown CUDA index, or an unparsable name.
    """
    if spec is None:
        return torch.device("cpu")
    label = f"{flag} {spec}" if flag.startswith("--") else f"{flag}{str(spec)!r}"  # --device cuda / device='cuda'
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(str(spec).strip().lower())
    except (RuntimeError, ValueError):
        raise DeviceError(f"{label}: expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            hint = f"{flag} cpu or {flag} auto" if flag.startswith("--") else f"{flag}'cpu' or {flag}'auto'"
            raise DeviceError(f"{label}: CUDA is not available on this machine (torch.cuda.is_available() is "
                              f"False); use {hint}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{label}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer; ``cpu`` for a model without tensors)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (Tensor, tuple / list, dict, nested; other values unchanged).

    Pinned CPU tensors are copied asynchronously to CUDA (``non_blocking``); a tensor already there is returned
    as is.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned() and device.type == "cuda")
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def states_off_device(model: nn.Module, device: torch.device | None = None) -> list[str]:
    """Names of the parameters, buffers and observer statistics of ``model`` that are not on ``device``
    (default: the model's device); empty when everything lives together."""
    device = model_device(model) if device is None else device
    off = [f"{name} ({t.device})" for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.device != device]
    for name, mod in model.named_modules():
        obs = getattr(mod, "observer", None)
        for key, value in (vars(obs).items() if obs is not None else ()):
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub_key, t in items:
                if isinstance(t, torch.Tensor) and t.device != device:
                    where = key if sub_key is None else f"{key}[{sub_key!r}]"
                    off.append(f"{name}.observer.{where} ({t.device})")
    return off


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)`` that also moves the observers' statistics (plain attributes, not buffers)."""
    model.to(device)
    for mod in model.modules():
        obs = getattr(mod, "observer", None)
        if obs is None:
            continue
        for key, value in list(vars(obs).items()):
            if isinstance(value, torch.Tensor):
                setattr(obs, key, value.to(device))
            elif isinstance(value, dict):
                setattr(obs, key, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
    return model


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` / ``cpu``: the device for logs and reports."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def on_cpu(model: nn.Module) -> nn.Module:
    """``model`` itself when every tensor is on the CPU, else a CPU copy (the caller's model is not changed).

    What export, ONNX parity and the engine-kernel emulation run on: tracing and ONNX Runtime work on CPU
    tensors. The copy keeps ``lowbit_info`` (which ``GraphModule`` deep copies drop) and the observers.
    """
    cpu = torch.device("cpu")
    if not states_off_device(model, cpu):
        return model
    clone = copy.deepcopy(model)
    if hasattr(model, "lowbit_info") and not hasattr(clone, "lowbit_info"):
        clone.lowbit_info = model.lowbit_info
    log.debug("working on a CPU copy of a model on %s", model_device(model))
    return move_model(clone, cpu)


def copy_to(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``model`` on ``device`` (the original is not changed). A model on the CPU going to CUDA is
    copied tensor by tensor onto the device (no second full copy in host memory)."""
    source = model_device(model)
    if source.type == "cpu" and device.type != "cpu":
        memo: dict[int, Any] = {}
        for t in [*model.parameters(), *model.buffers()]:  # deepcopy puts these device copies in place
            memo[id(t)] = _device_clone(t, device)
        clone = copy.deepcopy(model, memo)
    else:
        clone = copy.deepcopy(model)
    if hasattr(model, "lowbit_info") and not hasattr(clone, "lowbit_info"):
        clone.lowbit_info = model.lowbit_info
    return move_model(clone, device)


def _device_clone(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    data = t.detach().to(device, copy=True)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def process_group_backend(device: torch.device) -> str:
    """``nccl`` for CUDA (when this torch build has it), else ``gloo``: what ``torch.distributed`` should use for
    tensors on ``device``."""
    import torch.distributed as dist

    if device.type == "cuda" and dist.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def check_local_processes(device: torch.device, processes: int) -> None:
    """Refuse, in one line, more processes on this machine than GPUs for ``--device cuda`` (NCCL needs one each).

    Raises:
        DeviceError: ``processes`` exceeds the visible GPUs.
    """
    count = torch.cuda.device_count() if device.type == "cuda" and device.index is None else processes
    if processes > count:
        raise DeviceError(f"--device cuda: {processes} processes on this machine need {processes} GPUs, "
                          f"{count} visible; use fewer processes (--nproc) or --device cpu")


def rank_device(device: torch.device) -> torch.device:
    """The device of this process in a group: ``cuda`` becomes ``cuda:LOCAL_RANK`` and is made current, as
    ``torchrun`` users expect; other devices are returned unchanged.

    Raises:
        DeviceError: more local processes (``LOCAL_WORLD_SIZE``) than visible GPUs (NCCL needs one GPU each).
    """
    import os

    if device.type != "cuda" or device.index is not None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device
    check_local_processes(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def place(model: nn.Module, device: str | torch.device | None, flag: str = "device=") -> nn.Module:
    """``model`` on ``device`` for a job: itself when ``device`` is None or already its device, else a copy
    (:func:`copy_to`; the caller's model is not changed).

    Raises:
        DeviceError: ``device`` cannot be used here (see :func:`resolve_device`).
    """
    if device is None:
        return model
    target = resolve_device(device, flag)
    if model_device(model) == target and not states_off_device(model, target):
        return model
    log.info("running on %s", describe(target))
    return copy_to(model, target)
