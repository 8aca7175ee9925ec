"""``lowbit.export.litert_rewrite.fold_same_pads`` checked against the LiteRT interpreter itself: the converter's
own file (TRANSPOSE → PAD → TRANSPOSE → VALID depthwise conv) and the rewritten one (SAME conv) must give the very
same output codes, with XNNPACK and with TFLite's reference kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")
pytest.importorskip("litert_torch", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")

import lowbit  # noqa: E402
from lowbit.export.litert import _convert, _static_quant_config, pt2e_form, to_tflite  # noqa: E402
from lowbit.export.litert_flatbuffer import load_model, op_summary  # noqa: E402
from lowbit.export.litert_rewrite import fold_same_pads, same_padding  # noqa: E402
from lowbit.export.litert_runtime import predictor  # noqa: E402


class _SamePadNet(nn.Module):
    """EfficientNet's stride-2 block shape: an asymmetric ``(p, p + 1)`` zero pad before a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pad = nn.ZeroPad2d((1, 2, 1, 2))  # SAME of k=5, s=2 on an even size
        self.dw = nn.Conv2d(8, 8, 5, stride=2, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.pw(torch.relu(self.dw(self.pad(torch.relu(self.conv1(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.fixture(scope="module")
def same_pad_files():
    torch.manual_seed(0)
    x = torch.rand(48, 3, 16, 16) * 2 - 0.5
    q = lowbit.quantize(_SamePadNet().eval(), x[:32], lowbit.preset("litert-int8"), x[:1])
    with pt2e_form(copy.deepcopy(q)) as m:
        raw = _convert(m, x[:1], _static_quant_config())
    return raw, fold_same_pads(raw), x[32:], q


def test_same_padding_formula():
    # TFLite: out = ceil(in / s), total = (out - 1) s + k_eff - in, before = total // 2
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(15, 3, 2) == (1, 1)
    assert same_padding(14, 3, 1) == (1, 1)
    assert same_padding(14, 3, 1, dilation=2) == (2, 2)
    assert same_padding(7, 1, 2) == (0, 0)


def test_pad_and_transposes_become_a_same_conv(same_pad_files):
    raw, (new, folded), _, _ = same_pad_files
    before, after = op_summary(raw).ops, op_summary(new).ops
    assert before["PAD"] == 1  # left by the converter between Q/DQ ops, with a TRANSPOSE on each side
    assert folded == 1 and after["PAD"] == 0 and after["TRANSPOSE"] == before["TRANSPOSE"] - 2
    assert after["DEPTHWISE_CONV_2D"] == before["DEPTHWISE_CONV_2D"] == 1
    model = load_model(new)
    assert len(model.buffers) < len(load_model(raw).buffers)  # the pad / perm constants are gone too
    assert op_summary(new).coverage() == 1.0


@pytest.mark.parametrize("xnnpack", [True, False])
def test_rewrite_is_bit_exact_on_the_interpreter(same_pad_files, xnnpack):
    raw, (new, _), x, _ = same_pad_files
    assert torch.equal(predictor(raw, 1, xnnpack)(x), predictor(new, 1, xnnpack)(x))


def test_rewrite_is_a_no_op_without_the_pattern(digits):
    model, calib, _, _ = digits
    q = lowbit.quantize(copy.deepcopy(model).eval(), calib, lowbit.preset("litert-int8"), calib[:1])
    with pt2e_form(copy.deepcopy(q)) as m:
        raw = _convert(m, calib[:1], _static_quant_config())
    new, folded = fold_same_pads(raw)
    assert folded == 0 and new == raw


def test_to_tflite_applies_the_rewrite(same_pad_files):
    raw, (new, _), x, q = same_pad_files
    data = to_tflite(q, x[:1], io="int8")
    assert op_summary(data).ops == op_summary(new).ops
    assert torch.equal(predictor(data)(x), predictor(raw)(x))
