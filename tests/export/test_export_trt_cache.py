"""TensorRT calibration cache: exact text format and tensor names that exist in the FP32 export."""

from __future__ import annotations

import os
import struct

import numpy as np
import onnx
import pytest

import lowbit
from lowbit.export.trt_cache import HEADER, activation_scales, format_cache, parse_cache


def test_format_cache_is_big_endian_float32_hex():
    text = format_cache({"input": 1.0, "/conv1/Conv_output_0": 0.5, "neg": -2.0, "tiny": 2.0**-20})
    assert text == (
        f"{HEADER}\n"
        "input: 3f800000\n"
        "/conv1/Conv_output_0: 3f000000\n"
        "neg: c0000000\n"
        "tiny: 35800000\n"
    )


def test_parse_format_round_trip_is_exact():
    rng = np.random.default_rng(0)
    scales = {f"t{i}": float(np.float32(v)) for i, v in enumerate(rng.uniform(1e-6, 10, 50))}
    scales["name: with colon"] = float(np.float32(0.1))
    back = parse_cache(format_cache(scales))
    assert back == scales  # bit-exact: every value is a float32
    assert list(back) == list(scales)
    for name, value in scales.items():
        line = next(ln for ln in format_cache(scales).splitlines() if ln.startswith(name + ": "))
        assert line.rpartition(": ")[2] == struct.pack(">f", value).hex()


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory, digits):
    model, calib, _, _ = digits
    q = lowbit.quantize(model, calib[:64], lowbit.preset("tensorrt-int8"), calib[:1], show_progress=False)
    out = tmp_path_factory.mktemp("trt")
    int8 = lowbit.export_onnx(q, calib[:1], out / "model_int8.onnx", target="tensorrt")
    fp32 = lowbit.export_onnx(q, calib[:1], out / "model_fp32.onnx", target="tensorrt", float_model=True)
    scales = lowbit.write_trt_calibration_cache(int8, out / "calibration.cache")
    return q, int8, fp32, out, scales


def test_cache_names_exist_in_fp32_export(trt_export):
    q, int8, fp32, out, scales = trt_export
    assert sorted(os.listdir(out)) == ["calibration.cache", "model_fp32.onnx", "model_int8.onnx"]
    text = (out / "calibration.cache").read_text()
    assert text.splitlines()[0] == HEADER
    assert parse_cache(text) == scales
    fp = onnx.load(str(fp32))
    tensors = {i.name for i in fp.graph.input} | {o for n in fp.graph.node for o in n.output}
    missing = sorted(set(scales) - tensors)
    assert not missing, f"cache names absent from the FP32 graph: {missing}"
    assert "input" in scales
    # one entry per activation quantizer, with its scale (amax / 127, zero-point 0)
    act = sorted(
        m.scale.item() for n, m in q.named_modules()
        if n.startswith("lowbit_act.") and isinstance(m, lowbit.nn.TensorQuantizer) and m.spec is not None
    )
    assert sorted(scales.values()) == pytest.approx(act, rel=1e-7)


def test_activation_scales_refuses_asymmetric(tmp_path, digits):
    model, calib, _, _ = digits
    q = lowbit.quantize(model, calib[:32], lowbit.preset("int8"), calib[:1], show_progress=False)
    path = lowbit.export_onnx(q, calib[:1], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="TensorRT needs symmetric"):
        activation_scales(onnx.load(str(path)))


def test_tensorrt_export_uses_signed_symmetric_narrow_weights(trt_export):
    q, int8, _, _, _ = trt_export
    for _, layer in lowbit.transforms.prepare.quant_layers(q):
        codes = layer.weight_quantizer.quantize_codes(layer.weight)
        assert codes.min() >= -127 and codes.max() <= 127
    proto = onnx.load(str(int8))
    zps = [n.input[2] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zps
    init = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    for name in zps:
        t = init.get(name) or consts[name]
        arr = onnx.numpy_helper.to_array(t)
        assert arr.dtype == np.int8 and not arr.any()
