"""Models the CLI hardening tests load as ``slow_models:<name>`` (this folder is put on sys.path)."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn


class SlowDigits(nn.Module):
    """A digits-shaped CNN whose forward sleeps, so a run stays in its staging phase long enough to be signalled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            time.sleep(6.0)
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def slow():
    torch.manual_seed(0)
    return SlowDigits()


def exits():
    sys.exit(3)
