"""Fixtures of the serving tests: a digits-cnn model folder made once per session, real digits inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit import preset
from lowbit.pipeline import quantize_to_dir
from lowbit.report.evaluate import EvalSet
from lowbit.zoo import load_data, load_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A ``lowbit quantize --model digits-cnn --data digits`` folder (made once per session)."""
    zm, zd = load_model("digits-cnn"), load_data("digits")
    out = tmp_path_factory.mktemp("serve") / "digits"
    labels = {"model": "digits-cnn", "data": "digits", "recipe": "int8", "calibrator": "percentile"}
    quantize_to_dir(zm.model, zm.example_input, zd.calib, preset("int8"), out,
                    EvalSet(zd.eval_inputs[:64], zd.eval_labels[:64], metric_name="accuracy"), labels=labels,
                    threads=1, repeats=1, show_progress=False)
    return out


@pytest.fixture(scope="session")
def digits_inputs() -> np.ndarray:
    """Real digits ``[N, 1, 8, 8]`` float32 (the evaluation split)."""
    return load_data("digits").eval_inputs.numpy().astype(np.float32)
