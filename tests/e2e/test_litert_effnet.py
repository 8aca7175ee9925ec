"""EfficientNet-Lite0 through the LiteRT target (slow): every conv and add int8 in the file, the layout the float
file has (no TRANSPOSE / PAD beyond the float file's: the stride-2 TensorFlow-SAME paddings become SAME convs),
parity with the interpreter, for the int8 head and the default float head."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")
pytest.importorskip("litert_torch", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")

import lowbit  # noqa: E402
from lowbit import zoo  # noqa: E402
from lowbit.export.litert import float_head, to_tflite  # noqa: E402
from lowbit.export.litert_flatbuffer import op_summary  # noqa: E402
from lowbit.export.litert_runtime import output_step, predictor  # noqa: E402
from lowbit.report.litert import code_parity  # noqa: E402

import torch  # noqa: E402


def test_effnet_litert_int8_file_and_parity():
    zm, data = zoo.load_model("efficientnet-lite0"), zoo.load_data("photos")
    q = lowbit.quantize(zm.model, data.calib[:16], lowbit.preset("litert-int8"), zm.example_input)
    int8, fp32 = to_tflite(q, zm.example_input, head="int8"), to_tflite(q, zm.example_input, float_model=True)
    s8, s32 = op_summary(int8), op_summary(fp32)
    assert s8.coverage() == 1.0 and not s8.float_ops
    assert s8.int8_ops["CONV_2D"] == s32.ops["CONV_2D"] and s8.int8_ops["ADD"] == s32.ops["ADD"]
    assert s8.int8_ops["DEPTHWISE_CONV_2D"] == s32.ops["DEPTHWISE_CONV_2D"]
    assert s8.ops["TRANSPOSE"] <= s32.ops["TRANSPOSE"] and s8.ops["PAD"] <= s32.ops["PAD"]
    x = data.eval_inputs[:8]
    with torch.no_grad():
        sim = q(x)
    assert code_parity(sim, predictor(int8)(x), output_step(int8)).ok
    head = to_tflite(q, zm.example_input)  # default: float logits
    sh = op_summary(head)
    assert sh.float_ops == {"FULLY_CONNECTED": 1} and sh.weight_dequantize == 1
    assert len(head) < len(int8) + 64 * 1024  # the classifier's weights stay int8
    with torch.no_grad(), float_head(q):
        sim = q(x)
    assert code_parity(sim, predictor(head)(x), None).ok
