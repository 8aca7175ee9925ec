"""Large data streams: a memory-mapped ``.npy`` and an image folder are read batch by batch (DataLoader
workers), calibration on them equals calibration on the same tensor in memory, sharded calibration reads only
its own batches, and long steps report progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lowbit
from lowbit.cli.sources import ImageFolderInputs, NpyInputs, load_image_folder, load_tensor_file
from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.data import StreamedInputs, iter_batches, num_batches
from lowbit.device import to_device
from lowbit.progress import progress_sink, progress_steps
from lowbit.transforms.prepare import quantizers

RECIPE = lowbit.Recipe(
    default_weight=QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
    default_input=QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)


def _array(n: int = 70) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.fixture
def npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _array())
    return path


class Counting(StreamedInputs):
    """Samples are their own index; records every load."""

    def __init__(self, n: int, batch_size: int = 8) -> None:
        super().__init__(n, (2,), batch_size)
        self.loads: list[list[int]] = []

    def load(self, indices):
        self.loads.append(list(indices))
        return torch.tensor(indices, dtype=torch.float32)[:, None].expand(-1, 2).clone()


def test_npy_is_memory_mapped_and_batches_are_exact(npy):
    x = load_tensor_file(npy)
    ref = _array()
    assert isinstance(x, NpyInputs) and isinstance(x.array, np.memmap)
    assert x.shape == torch.Size(ref.shape) and len(x) == 70
    batches = list(iter_batches(x, 32))
    assert [b.shape[0] for b in batches] == [32, 32, 6]
    assert torch.equal(torch.cat(batches), torch.from_numpy(ref))
    assert torch.equal(x[10:20][torch.tensor([0, 9])], torch.from_numpy(ref[[10, 19]]))
    batch = x[5:9].materialize()
    batch += 1  # a copy: the file is not written through the map
    assert torch.equal(load_tensor_file(npy).materialize(), torch.from_numpy(ref))


def test_workers_read_the_same_batches(npy):
    x = load_tensor_file(npy, workers=2)
    ref = torch.from_numpy(_array())
    assert torch.equal(torch.cat(list(x)), ref)
    assert torch.equal(torch.cat(list(iter_batches(x[3:50], 7))), ref[3:50])


def test_streaming_never_reads_more_than_a_batch():
    x = Counting(50, batch_size=8)
    assert num_batches(x, 8) == 7
    seen = sum(b.shape[0] for b in x[4:])
    assert seen == 46 and max(len(ix) for ix in x.loads) == 8 and x.loads[0][0] == 4


def _images(folder, n: int):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (10 + i, 12, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")


def test_image_folder_streams_the_same_pixels(tmp_path, caplog):
    folder = tmp_path / "pics"
    _images(folder, 9)
    x = load_image_folder(folder, torch.zeros(1, 3, 8, 6), None, workers=2)
    assert isinstance(x, ImageFolderInputs) and x.shape == (9, 3, 8, 6)
    ref = []
    for i in range(9):  # independent reference: PIL's bilinear resize, scaled to [0, 1], channels first
        with Image.open(folder / f"img{i:02d}.png") as img:
            arr = np.asarray(img.convert("RGB").resize((6, 8), Image.BILINEAR), dtype=np.float32) / 255.0
        ref.append(torch.from_numpy(arr).permute(2, 0, 1))
    x.batch_size = 4
    assert torch.equal(torch.cat(list(x)), torch.stack(ref))
    assert any("skipped 1 of 10 files" in r.getMessage() for r in caplog.records)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 5)).eval()


def test_calibration_on_streamed_data_equals_in_memory(npy):
    streamed = lowbit.quantize(_net(), load_tensor_file(npy, workers=1), RECIPE, show_progress=False)
    memory = lowbit.quantize(_net(), torch.from_numpy(_array()), RECIPE, show_progress=False)
    pairs = list(zip(quantizers(streamed), quantizers(memory)))
    assert len(pairs) >= 3
    for (name, a), (_, b) in pairs:
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), name


def test_sharded_calibration_reads_only_its_batches(monkeypatch):
    from lowbit.ptq import distributed

    x = Counting(40, batch_size=8)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(distributed, "merge_observers_", lambda model: 0)
    loop = distributed.sharded_forward_loop(x, batch_size=8)
    assert x.loads == []  # building the loop reads nothing
    loop(nn.Identity())
    assert x.loads == [list(range(16, 24)), list(range(24, 32)), list(range(32, 40))]


def test_progress_reports_every_batch_and_ends():
    events = []
    with progress_sink(events.append):
        lowbit.quantize(_net(), torch.from_numpy(_array(70)), RECIPE)
    calib = [e for e in events if e.description == "calibrating"]
    assert [e.done for e in calib] == [0, 1, 2, 3, 3] and calib[0].total == 3 and calib[-1].finished
    with progress_sink(events.append):
        list(progress_steps(range(3), "quiet", enabled=False))
    assert not any(e.description == "quiet" for e in events)


def test_rich_bars_start_and_stop_with_the_steps():
    from rich.console import Console

    from lowbit.cli.bars import RichBars

    bars = RichBars(Console(file=open("/dev/null", "w"), force_terminal=True))
    with progress_sink(bars):
        for _ in progress_steps(range(3), "outer"):
            assert bars.progress is not None
            list(progress_steps(range(2), "inner"))
            assert len(bars.tasks) == 1
    assert bars.progress is None and bars.tasks == {}


def test_to_device_keeps_the_batch_conventions():
    from collections import namedtuple

    cpu = torch.device("cpu")
    meta = torch.device("meta")
    pair = namedtuple("Pair", "x y")(torch.ones(2), torch.zeros(2))
    moved = to_device({"a": (torch.ones(1), [torch.zeros(1), "label"]), "b": pair, "n": 3}, meta)
    assert moved["a"][0].device == meta and moved["a"][1][0].device == meta and moved["a"][1][1] == "label"
    assert type(moved["b"]).__name__ == "Pair" and moved["b"].y.device == meta and moved["n"] == 3
    same = torch.ones(2)
    assert to_device(same, cpu) is same


def test_sweep_callback_reports_through_the_sink():
    from lowbit.progress import progress_callback

    events = []
    with progress_sink(events.append):
        update = progress_callback("sensitivity")
    update(1, 2, "isolated conv1")  # the sink is the one installed when the callback was made
    update(2, 2, "isolated fc")
    assert [(e.description, e.done, e.total, e.finished) for e in events] == [
        ("sensitivity: isolated conv1", 1, 2, False), ("sensitivity: isolated fc", 2, 2, True)]
