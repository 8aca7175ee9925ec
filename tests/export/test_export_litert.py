"""LiteRT export of lowbit's own quantization, checked against independent references: the LiteRT interpreter
(XNNPACK and TFLite's reference kernels) and a numpy re-computation of an int8 convolution from the file's own
tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")
pytest.importorskip("litert_torch", reason="LiteRT extra not installed: pip install 'lowbit[litert]'")

import lowbit  # noqa: E402
from lowbit.export.litert import (LiteRTConversionError, _convert, _dequantized_weight,  # noqa: E402
                                  _static_quant_config, conversion_error_line, float_head, pt2e_form, to_tflite)
from lowbit.export.litert_rewrite import int8_weights_behind_dequantize  # noqa: E402
from lowbit.export.litert_flatbuffer import op_summary  # noqa: E402
from lowbit.export.litert_runtime import make_interpreter, output_step, predictor  # noqa: E402
from lowbit.export.runtime import parity  # noqa: E402
from lowbit.report.litert import code_parity  # noqa: E402
from lowbit.nn import TensorQuantizer  # noqa: E402


@pytest.fixture(scope="module")
def digits_litert(digits):
    model, calib, eval_x, _ = digits
    q = lowbit.quantize(copy.deepcopy(model).eval(), calib, lowbit.preset("litert-int8"), calib[:1])
    return {
        "q": q, "x": eval_x[:96],
        "int8": to_tflite(q, calib[:1], head="int8"),
        "head": to_tflite(q, calib[:1]),  # default: float logits
        "int8_io": to_tflite(q, calib[:1], io="int8"),
        "fp32": to_tflite(q, calib[:1], float_model=True),
    }


def test_every_compute_op_is_int8_with_float_interface(digits_litert):
    s = op_summary(digits_litert["int8"])
    assert s.coverage() == 1.0
    assert not s.float_ops
    for op in ("CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"):
        assert s.int8_ops[op] >= 1
    assert s.input_types == ["FLOAT32"] and s.output_types == ["FLOAT32"]
    assert s.ops["QUANTIZE"] == 1 and s.ops["DEQUANTIZE"] == 1
    s_io = op_summary(digits_litert["int8_io"])
    assert s_io.input_types == ["INT8"] and s_io.output_types == ["INT8"]
    assert "QUANTIZE" not in s_io.ops


def test_file_holds_lowbit_qparams_exactly(digits_litert):
    interp = make_interpreter(digits_litert["int8"])
    in_file = {(np.float32(d["quantization"][0]), int(d["quantization"][1]))
               for d in interp.get_tensor_details() if d["dtype"] == np.int8 and d["quantization"][0] > 0}
    ours = {(np.float32(float(m.scale)), int(m.zero_point)) for m in digits_litert["q"].modules()
            if isinstance(m, TensorQuantizer) and m.is_active and m.scale.numel() == 1}
    assert ours <= in_file  # every activation quantizer's float32 scale and zero-point, unchanged


def test_interpreter_matches_simulation(digits_litert):
    x = digits_litert["x"]
    with torch.no_grad():
        sim = digits_litert["q"](x)
    out = predictor(digits_litert["int8"])(x)
    step = output_step(digits_litert["int8"])
    assert step == pytest.approx(float(digits_litert["q"].lowbit_act.fc_out.scale), rel=1e-7)
    par = code_parity(sim, out, step)
    assert par.ok, par
    assert par.max_abs_diff <= 1e-5  # XNNPACK requantizes like lowbit's engine emulation: no code differs here
    out_io = predictor(digits_litert["int8_io"])(x)
    assert torch.equal(out_io, out)


def test_fp32_file_matches_torch(digits, digits_litert):
    model, _, eval_x, _ = digits
    with torch.no_grad():
        ref = model(eval_x[:32])
    assert torch.allclose(predictor(digits_litert["fp32"])(eval_x[:32]), ref, atol=1e-4)


def _first_stride1_conv(interp):
    details = {d["index"]: d for d in interp.get_tensor_details()}
    for op in interp._get_ops_details():
        if op["op_name"] != "CONV_2D":
            continue
        x, w, b = (details[i] for i in op["inputs"])
        y = details[op["outputs"][0]]
        if list(x["shape"][1:3]) == list(y["shape"][1:3]):
            return x, w, b, y
    raise AssertionError("no stride-1 CONV_2D in the file")


def test_reference_conv_equals_numpy_integer_recomputation(digits_litert):
    """TFLite's reference int8 CONV_2D (fixed-point multiplier) vs numpy: same codes within one step."""
    interp = make_interpreter(digits_litert["int8"], xnnpack=False)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=digits_litert["int8"], experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], digits_litert["x"][:1].numpy())
    interp.invoke()
    x_d, w_d, b_d, y_d = _first_stride1_conv(interp)
    qx, qw, qb, qy = (interp.get_tensor(d["index"]).astype(np.int64) for d in (x_d, w_d, b_d, y_d))
    s_x, z_x = x_d["quantization"]
    s_w = w_d["quantization_parameters"]["scales"]
    assert not w_d["quantization_parameters"]["zero_points"].any()
    s_y, z_y = y_d["quantization"]
    kh, kw = qw.shape[1:3]
    padded = np.pad(qx - z_x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = qx.shape[1:3]
    acc = np.zeros(qy.shape, dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            acc += np.einsum("nhwc,oc->nhwo", padded[:, i:i + h, j:j + w, :], qw[:, i, j, :])
    acc += qb
    ref = np.clip(np.round(acc * (np.float64(s_x) * s_w / np.float64(s_y))) + z_y, -128, 127)
    assert np.abs(ref - qy).max() <= 1
    assert (ref == qy).mean() >= 0.99


class _SinNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.sin(self.conv1(x)))


def test_op_without_int8_form_stays_float_and_is_listed():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    q = lowbit.quantize(_SinNet().eval(), x, lowbit.preset("litert-int8"), x[:1])
    s = op_summary(to_tflite(q, x[:1]))
    assert s.float_ops["SIN"] == 1 and s.int8_ops["CONV_2D"] == 1
    assert [op["op"] for op in s.float_compute] == ["SIN"]
    assert 0 < s.coverage() < 1
    out = predictor(to_tflite(q, x[:1]))(x)
    with torch.no_grad():
        assert parity(q(x), out).ok


def test_converter_error_is_one_line_naming_the_op():
    exc = RuntimeError("loc(\"x\"): error\n'tfl.foo' op is not supported in int8\nmore")
    line = conversion_error_line(exc)
    assert "\n" not in line and "tfl.foo" in line
    assert issubclass(LiteRTConversionError, RuntimeError)


def test_io_mode_is_checked(digits_litert):
    with pytest.raises(ValueError, match="io"):
        to_tflite(digits_litert["q"], digits_litert["x"][:1], io="uint8")


def test_float_head_is_the_default_and_matches_simulation(digits_litert):
    s = op_summary(digits_litert["head"])
    assert s.float_ops == {"FULLY_CONNECTED": 1} and s.weight_dequantize == 1
    assert s.output_types == ["FLOAT32"] and output_step(digits_litert["head"]) is None
    x, q = digits_litert["x"], digits_litert["q"]
    with torch.no_grad(), float_head(q):
        sim = q(x)
    out = predictor(digits_litert["head"])(x)
    assert parity(sim, out).ok
    assert (sim.argmax(1) == out.argmax(1)).float().mean() >= 0.99


def test_int8_weights_behind_dequantize_are_bit_exact(digits_litert):
    """The float head's weights as int8 codes + DEQUANTIZE give the very outputs of the float-weight file."""
    m, x = copy.deepcopy(digits_litert["q"]), digits_litert["x"]
    with float_head(m) as head, pt2e_form(m):
        codes = _dequantized_weight(head[2])
        raw = _convert(m, x[:1], _static_quant_config())
    packed = int8_weights_behind_dequantize(raw, [codes])
    assert op_summary(raw).weight_dequantize == 0 and op_summary(packed).weight_dequantize == 1
    assert len(packed) < len(raw) - codes[0].size  # 4 bytes → 1 byte a weight
    for xnnpack in (True, False):
        assert torch.equal(predictor(raw, 1, xnnpack)(x), predictor(packed, 1, xnnpack)(x))


def test_head_float_needs_float_io(digits_litert):
    with pytest.raises(ValueError, match="head"):
        to_tflite(digits_litert["q"], digits_litert["x"][:1], io="int8", head="float")
