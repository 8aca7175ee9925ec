"""Models and eval functions the CLI tests load as ``lowbit_cli_models:<name>`` (this folder is put on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

EVAL_INPUTS = torch.linspace(0, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def tiny():
    torch.manual_seed(0)
    return TinyNet()


def broken():
    raise RuntimeError("boom while building")


def not_a_module():
    return 42


def first_logit_mean(predict):
    """A metric that depends on the model's outputs (so the test can recompute it from the ONNX files)."""
    return float(predict(EVAL_INPUTS)[:, 0].double().mean())
