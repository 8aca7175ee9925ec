"""``--device`` and ``--workers`` on the command line: resolved when the command runs, one-line errors, the
same outputs from streamed data as from the same data in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.cli.main import build_parser, main

HERE = Path(__file__).parent
COMMON = ["--model", "lowbit_cli_models:tiny", "--input-shape", "1,3,8,8"]


@pytest.fixture(autouse=True)
def _helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _npy(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).random((n, 3, 8, 8), dtype=np.float32))
    return path


@pytest.mark.parametrize("command, extra", [
    ("quantize", []), ("analyze", []), ("qat", ["--epochs", "1"]),
    ("quantize", ["--min-agreement", "0.99"]),  # the search runs on the same device
])
def test_cuda_without_cuda_is_one_line_naming_the_flag(capsys, tmp_path, no_cuda, command, extra):
    out = tmp_path / "out"
    rc = main([command, *COMMON, "--data", str(_npy(tmp_path)), "--out", str(out), "--device", "cuda", *extra])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("lowbit: error: --device cuda: CUDA is not available") and "--device cpu" in err[0]
    assert not out.exists()


def test_unknown_device_is_one_line(capsys, tmp_path):
    rc = main(["quantize", *COMMON, "--data", str(_npy(tmp_path)), "--out", str(tmp_path / "o"), "--device", "gpu0"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and "--device gpu0:" in err[0] and "cpu, cuda, auto" in err[0]


def test_device_is_parsed_not_resolved(no_cuda):
    """The parser keeps the word; the device is resolved when the command runs (never at import or parse)."""
    for command in ("quantize", "analyze", "qat", "demo"):
        extra = [] if command == "demo" else [*COMMON, "--data", "x.npy", "--out", "o"]
        args = build_parser().parse_args([command, *extra, "--device", "cuda", "--workers", "3"])
        assert args.device == "cuda" and args.workers == 3
    assert build_parser().parse_args(["quantize", *COMMON, "--data", "x", "--out", "o"]).device == "cpu"


def test_auto_streamed_npy_with_workers_matches_in_memory(tmp_path, no_cuda):
    """``--device auto`` (the CPU here) and a memory-mapped .npy read by 2 DataLoader workers give the same
    qparams as the same inputs handed over as one .pt tensor."""
    npy = _npy(tmp_path)
    pt = tmp_path / "calib.pt"
    torch.save(torch.from_numpy(np.load(npy)), pt)
    reports = []
    for data, extra in ((npy, ["--device", "auto", "--workers", "2"]), (pt, [])):
        out = tmp_path / f"out_{data.suffix[1:]}"
        rc = main(["quantize", *COMMON, "--data", str(data), "--calibrator", "minmax", "--out", str(out),
                   "--repeats", "1", *extra])
        assert rc == 0
        reports.append(json.loads((out / "report.json").read_text()))
    assert reports[0]["eval_samples"] == reports[1]["eval_samples"] == 40
    for key in ("metric_int8", "metric_int8_simulated", "top1_agreement"):
        assert reports[0][key] == reports[1][key]
