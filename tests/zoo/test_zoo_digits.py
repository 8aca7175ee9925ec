"""Digits data split, DigitsCNN traceability, training accuracy and the weights cache."""

from __future__ import annotations

import logging
import operator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from lowbit.zoo import digits
from lowbit.zoo.cache import save_atomic, user_cache_dir

State = dict[str, torch.Tensor]


def _same_state(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_sizes_disjoint_deterministic() -> None:
    split = digits.load_digits_split()
    sizes = (len(split.y_train), len(split.y_calib), len(split.y_test))
    assert sizes == (1078, 270, 449)
    idx = np.concatenate([split.train_idx, split.calib_idx, split.test_idx])
    assert len(np.unique(idx)) == 1797
    digits.load_digits_split.cache_clear()
    again = digits.load_digits_split()
    assert again is not split and np.array_equal(again.test_idx, split.test_idx)
    assert torch.equal(again.x_calib, split.x_calib)


def test_split_tensors() -> None:
    split = digits.load_digits_split()
    assert split.x_train.shape == (1078, 1, 8, 8) and split.x_train.dtype == torch.float32
    assert split.y_test.dtype == torch.int64 and set(split.y_test.tolist()) == set(range(10))
    assert split.x_test.min() >= 0 and split.x_test.max() <= 1 and split.x_test.max() == 1


def test_digits_cnn_fx_traceable() -> None:
    model = digits.DigitsCNN().eval()
    gm = torch.fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 1
    (user,) = adds[0].users
    assert isinstance(gm.get_submodule(user.target), torch.nn.ReLU)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(gm(x), model(x))


def test_trained_accuracy(digits_cache: tuple[Path, State]) -> None:
    model = digits.DigitsCNN()
    model.load_state_dict(digits_cache[1])
    split = digits.load_digits_split()
    assert digits.accuracy(model.eval(), split.x_test, split.y_test) >= 0.97


def test_cache_round_trip(
    digits_cache: tuple[Path, State], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir, state = digits_cache
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(cache_dir))
    path = digits.digits_cache_path()
    assert path.parent == cache_dir and path.is_file()
    assert f"-v{digits.ARCH_VERSION}-" in path.name
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]

    def no_training(seed: int = 0) -> digits.DigitsCNN:
        raise AssertionError("should load from cache, not train")

    monkeypatch.setattr(digits, "train_digits_cnn", no_training)
    model = digits.load_digits_cnn()
    assert not model.training
    assert _same_state(model.state_dict(), state)


def test_corrupt_cache_retrains(
    digits_cache: tuple[Path, State],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    path = digits.digits_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not a torch checkpoint")
    with caplog.at_level(logging.WARNING, logger="lowbit.zoo.digits"):
        model = digits.load_digits_cnn()
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert _same_state(model.state_dict(), digits_cache[1]), "training is deterministic"
    reloaded = torch.load(path, weights_only=True)
    assert _same_state(reloaded, digits_cache[1])


def test_user_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWBIT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "lowbit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "lowbit"
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "own"))
    assert user_cache_dir() == tmp_path / "own"


def test_save_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.pt"
    save_atomic({"a": torch.arange(3)}, target)
    save_atomic({"a": torch.arange(4)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.arange(4))
    assert [p.name for p in target.parent.iterdir()] == ["x.pt"]
