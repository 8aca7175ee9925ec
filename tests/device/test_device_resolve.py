"""Resolving ``cpu`` / ``cuda`` / ``auto`` at run time, the process-group backend per device, and the Python
entry points' ``device=``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core import PerTensor, QuantSpec
from lowbit.data import run_batch
from lowbit.device import DeviceError, model_device, place, process_group_backend, resolve_device

META = torch.device("meta")
RECIPE = lowbit.Recipe(
    default_weight=QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerTensor(), calibrator="minmax"),
    default_input=QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)


def test_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^--device cuda: CUDA is not available .*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"^device='cuda:1': CUDA is not available.*use device='cpu'"):
        resolve_device("cuda:1", "device=")
    with pytest.raises(DeviceError, match="expected one of cpu, cuda, auto"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")  # resolved now, not when lowbit was imported
    with pytest.raises(DeviceError, match="has 1 CUDA device"):
        resolve_device("cuda:1")


def test_backend_follows_the_device(monkeypatch):
    import torch.distributed as dist

    assert process_group_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert process_group_backend(torch.device("cuda", 0)) == "gloo"


def test_batches_move_to_the_models_device():
    model = nn.Linear(3, 2).to(META)
    for batch in (torch.ones(4, 3), (torch.ones(4, 3), torch.zeros(4)), [torch.ones(4, 3)]):
        assert run_batch(model, batch).device == META
    assert run_batch(lambda x: x.sum().item(), (torch.ones(3), "label")) == 3.0  # a plain callable: untouched


def test_place_copies_only_when_it_must():
    model = nn.Linear(3, 2)
    assert place(model, None) is model and place(model, "cpu") is model
    moved = place(model, META)
    assert moved is not model and model_device(moved) == META and model_device(model).type == "cpu"


def test_quantize_device_argument(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(16, 4)
    ref = lowbit.quantize(model, x, RECIPE, show_progress=False)
    q = lowbit.quantize(model, x, RECIPE, show_progress=False, device="cpu")
    for (a, b) in zip(ref.state_dict().values(), q.state_dict().values()):
        assert torch.equal(a, b)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="^device='cuda': CUDA is not available"):
        lowbit.quantize(model, x, RECIPE, device="cuda")
    assert lowbit.quantize(model, x, RECIPE, show_progress=False, device="auto") is not model


def test_rank_device_takes_the_local_rank(monkeypatch):
    from lowbit import device as device_mod

    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert device_mod.rank_device(torch.device("cuda")) == torch.device("cuda", 1) == current[-1]
    assert device_mod.rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0) == current[-1]
    assert device_mod.rank_device(torch.device("cpu")) == torch.device("cpu") and len(current) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(DeviceError, match="4 processes on this machine need 4 GPUs, 2 visible"):
        device_mod.rank_device(torch.device("cuda"))


def test_cli_joins_the_group_with_the_devices_backend(monkeypatch, tmp_path):
    import contextlib

    from lowbit.cli import main as cli_main

    seen = []

    @contextlib.contextmanager
    def fake_group(backend="gloo"):
        seen.append(backend)
        yield 0, 1

    monkeypatch.setattr(cli_main, "process_group", fake_group)
    monkeypatch.setattr(cli_main, "run_quantize", lambda args, *a: seen.append(args.device) or 0)
    assert cli_main.main(["quantize", "--model", "m:f", "--data", "d", "--out", str(tmp_path / "o"),
                          "--device", "cpu"]) == 0
    assert seen == ["gloo", torch.device("cpu")]
    monkeypatch.setattr(cli_main, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(cli_main, "rank_device", lambda d: d)
    monkeypatch.setattr(cli_main, "process_group_backend", lambda d: "nccl" if d.type == "cuda" else "gloo")
    seen.clear()
    assert cli_main.main(["quantize", "--model", "m:f", "--data", "d", "--out", str(tmp_path / "o"),
                          "--device", "cuda"]) == 0
    assert seen == ["nccl", torch.device("cuda", 0)]
