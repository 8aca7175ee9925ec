"""report.engine_ops: the float heavy ops ONNX Runtime really executes, with reasons, on real files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lowbit
from lowbit.export.onnx_static import export_onnx
from lowbit.export.runtime import optimized_op_types
from lowbit.report.engine_ops import HEAVY_OPS, engine_accounting, merge_float_layers, module_of, slowdown
from lowbit.report.render import to_markdown


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


def test_recipe_float_layer_is_found_in_the_engine_graph_and_merged(tmp_path):
    torch.manual_seed(0)
    calib = torch.rand(32, 3, 8, 8)
    recipe = lowbit.preset("int8").keep_float("conv2")
    q = lowbit.quantize(TwoConv().eval(), list(calib.split(16)), recipe, calib[:1], show_progress=False)
    path = export_onnx(q, calib[:1], tmp_path / "m.onnx", check_parity=False)
    acc = engine_accounting(path)
    ops = optimized_op_types(path)
    # every heavy node ORT executes in float is listed, and nothing else
    assert len(acc["float_heavy_ops"]) == sum(n for op, n in ops.items() if op in HEAVY_OPS)
    conv2 = [e for e in acc["float_heavy_ops"] if module_of(e["layer"]) == "conv2"]
    assert len(conv2) == 1 and conv2[0]["reason"].startswith("input not quantized")
    # conv1 keeps its Q/DQ input, weight and bias, but its output now feeds a float conv2 through no
    # QuantizeLinear, so ORT runs it in float too: listed although no recipe rule names it
    conv1 = [e for e in acc["float_heavy_ops"] if module_of(e["layer"]) == "conv1"]
    assert len(conv1) == 1 and conv1[0]["reason"].startswith("output not quantized")
    assert acc["integer_kernel_ops"] == {"QGemm": 1}
    declared = [{"layer": n, "reason": r} for n, r in q.lowbit_info.float_layers]
    merged = merge_float_layers(declared, acc["float_heavy_ops"])
    entry = next(e for e in merged if e["layer"] == "conv2")
    assert entry["reason"] == "kept in float by a recipe rule" and entry["node"] == conv2[0]["layer"]
    assert [e["layer"] for e in merged].count("conv2") == 1
    assert not any(module_of(e["layer"]) == "conv2" for e in merged if e is not entry)
    assert any(e["layer"] == conv1[0]["layer"] for e in merged)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _conv_file(path, weight_q: bool, bias: str, out_q: bool):
    """A Q/DQ Conv written by hand: input always Q/DQ; weight int8 or float; bias int32 / float; output Q or not."""
    rng = np.random.default_rng(0)
    inits = [_init("s", np.float32(0.02)), _init("zp", np.uint8(128)), _init("ws", np.float32(0.01)),
             _init("wzp", np.int8(0))]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x"])]
    if weight_q:
        inits.append(_init("wq", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"]))
    else:
        inits.append(_init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)))
    if bias == "int32":
        inits += [_init("bq", np.arange(4, dtype=np.int32)), _init("bs", np.float32(0.0002))]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs"], ["b"]))
    else:
        inits.append(_init("b", np.zeros(4, np.float32)))
    conv_out = "y" if out_q else "output"
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], [conv_out], name="conv", pads=[1, 1, 1, 1]))
    if out_q:
        nodes += [helper.make_node("QuantizeLinear", ["y", "s", "zp"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "s", "zp"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("weight_q, bias, out_q, reason", [
    (True, "int32", True, None),
    (False, "int32", True, "weight not quantized"),
    (True, "float", True, None),  # ONNX Runtime quantizes a constant float bias itself
    (True, "int32", False, "output not quantized"),
])
def test_reason_for_each_way_a_conv_stays_float(tmp_path, weight_q, bias, out_q, reason):
    acc = engine_accounting(_conv_file(tmp_path / "c.onnx", weight_q, bias, out_q))
    if reason is None:
        assert acc["float_heavy_ops"] == [] and acc["integer_kernel_ops"] == {"QLinearConv": 1}
    else:
        assert len(acc["float_heavy_ops"]) == 1 and acc["int8_kernels"] == 0
        assert acc["float_heavy_ops"][0]["reason"].startswith(reason)


def test_module_of_torchscript_node_names():
    assert module_of("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_of("/_fc/Gemm") == "_fc"
    assert module_of("/features/conv/Conv") == "features.conv"
    assert module_of("Conv_3") is None


def test_slowdown_sentence_and_markdown():
    fast = {"latency_ms_fp32_b1": 2.0, "latency_ms_int8_b1": 1.0, "latency_ms_fp32_b32": 20.0, "latency_ms_int8_b32": 10.0}
    assert slowdown(fast) is None
    slow = dict(fast, latency_ms_int8_b32=25.0, float_heavy_ops=[{"layer": "/fc/Gemm", "op": "Gemm", "reason": "x"}],
                qdq_conversion_ops={"QuantizeLinear": 3, "DequantizeLinear": 4})
    text = slowdown(slow)
    assert "batch 32: 25.00 ms vs 20.00 ms" in text and "batch 1" not in text
    assert "1 heavy op(s) run in float" in text and "7 QuantizeLinear / DequantizeLinear" in text
    report = dict(slow, metric_fp32=1.0, metric_int8=1.0, top1_agreement=1.0, kl=0.0, sqnr_db=40.0, cosine=1.0,
                  mse=0.0, size_bytes_fp32=4, size_bytes_int8=1, parity_ok=True, float_layers=[], slowdown=text,
                  int8_kernels=2, integer_kernel_ops={"QLinearConv": 2}, float_ops={"Gemm": 1, "Reshape": 1})
    md = to_markdown(report)
    assert "- integer kernels (2): QLinearConv x2" in md
    assert "- float ops and data movement (2): Gemm x1, Reshape x1" in md
    assert "- float ↔ integer conversions (7): QuantizeLinear x3, DequantizeLinear x4" in md
    assert "heavy ops (Conv, MatMul, Gemm, LSTM, ...) executed in float: 1 — `/fc/Gemm` (Gemm)" in md
    assert f"**Warning: {text}.**" in md
    assert "Gemm" not in md.split("- integer kernels")[1].split("\n")[0]  # float ops are not called integer kernels
