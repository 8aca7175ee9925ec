"""export.optimize.clean_onnx: pads folded and fused, Q/DQ and int8 weights kept, names kept, ORT runs
the same integer kernels as on ONNX Runtime's own quantize_static file of the same model."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.export.onnx_static import check_onnx_parity, export_onnx
from lowbit.export.runtime import optimized_op_types
from lowbit.report.engine_ops import engine_accounting

PAD_SUBGRAPH = {"Pad", "ConstantOfShape", "Cast", "Transpose", "Slice", "Concat"}


class PadNet(nn.Module):
    """EfficientNet-Lite's shape in small: TF-'same' zero pads before a strided stem and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2)
        self.dw_pad = nn.ZeroPad2d(1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.stem(self.stem_pad(x)))
        x = self.act(self.pw(self.act(self.dw(self.dw_pad(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("optimize")
    calib = torch.rand(64, 3, 16, 16)
    q = lowbit.quantize(PadNet().eval(), list(calib.split(16)), lowbit.preset("int8"), calib[:1], show_progress=False)
    paths = {}
    for clean in (False, True):
        for fp in (True, False):
            path = tmp / f"{'fp32' if fp else 'int8'}_{'clean' if clean else 'raw'}.onnx"
            paths[(fp, clean)] = export_onnx(q, calib[:1], path, float_model=fp, clean=clean, check_parity=False)
    return q, calib, paths, tmp


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _int8_weights(path) -> dict[str, np.ndarray]:
    """int8 constants (initializers or Constant nodes) read by a DequantizeLinear, by DequantizeLinear output name."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inits |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    return {n.output[0]: inits[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8}


def test_traced_pads_are_folded_and_fused(exported):
    _, _, paths, _ = exported
    for fp in (True, False):
        raw, clean = _ops(paths[(fp, False)]), _ops(paths[(fp, True)])
        assert raw["Pad"] == 2 and raw["ConstantOfShape"] >= 1  # what the TorchScript exporter leaves
        assert not PAD_SUBGRAPH & set(clean), clean
        assert clean["Conv"] == 3 and "Constant" not in clean


def test_qdq_nodes_and_int8_weights_survive(exported):
    _, _, paths, _ = exported
    raw, clean = _ops(paths[(False, False)]), _ops(paths[(False, True)])
    assert clean["QuantizeLinear"] == raw["QuantizeLinear"] and clean["DequantizeLinear"] == raw["DequantizeLinear"]
    w_raw, w_clean = _int8_weights(paths[(False, False)]), _int8_weights(paths[(False, True)])
    assert len(w_clean) == len(w_raw) == 4  # 3 conv weights + the fc weight, still int8 behind a DQ
    assert sorted(a.tobytes() for a in w_clean.values()) == sorted(a.tobytes() for a in w_raw.values())
    floats = [numpy_helper.to_array(t) for t in onnx.load(str(paths[(False, True)])).graph.initializer]
    float_elements = sum(a.size for a in floats if a.dtype == np.float32)  # scales only: no weight got folded
    assert float_elements < sum(a.size for a in w_clean.values()) / 4
    assert paths[(False, True)].stat().st_size <= paths[(False, False)].stat().st_size


def test_names_batch_axis_and_quantized_tensors_kept(exported):
    _, _, paths, _ = exported
    fp, q = onnx.load(str(paths[(True, True)])), onnx.load(str(paths[(False, True)]))
    for m in (fp, q):
        assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["output"]
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    fp_tensors = {"input"} | {o for n in fp.graph.node for o in n.output}
    quantized = [n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert quantized[0] == "input"  # the stem quantizer moved in front of its (now fused) pad
    assert set(quantized) <= fp_tensors  # analysis.onnx_tensors / trt_cache look these names up in the FP32 file


def test_parity_holds_after_cleaning(exported):
    q, calib, paths, _ = exported
    for clean in (False, True):
        assert check_onnx_parity(q, paths[(False, clean)], calib).fraction_within_step == 1.0


def test_engine_runs_what_onnxruntime_quantize_static_runs(exported):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _, calib, paths, tmp = exported

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.numpy()} for b in calib.split(16)])

        def get_next(self):
            return next(self.batches, None)

    pre, ort_q = tmp / "pre.onnx", tmp / "ort_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(paths[(True, False)]), str(pre))
        quantize_static(str(pre), str(ort_q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ort_ops = optimized_op_types(ort_q)
    raw = engine_accounting(paths[(False, False)])
    ours = engine_accounting(paths[(False, True)])
    # the quantizers sit before the zero pads (the pads are crossed), so even before cleaning ORT fuses each Pad
    # into its QLinearConv instead of running it in float
    assert "Pad" not in raw["float_ops"]
    assert ours["float_heavy_ops"] == [] and "Pad" not in ours["float_ops"] and "Pad" not in ort_ops
    assert ours["integer_kernel_ops"].get("QLinearConv") == ort_ops["QLinearConv"] == 3
    assert ours["integer_kernel_ops"].get("QGemm") == ort_ops["QGemm"] == 1
    assert sum(ours["qdq_conversion_ops"].values()) <= sum(ort_ops[k] for k in ("QuantizeLinear", "DequantizeLinear"))


def _pad_qdq_conv(mode: str, value: float | None) -> onnx.ModelProto:
    """input → Pad(mode, value) → Q → DQ → Conv(int8 weight behind a DQ) → output, written by hand."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), ("s", np.array(0.02, np.float32)),
        ("zp", np.array(128, np.uint8)), ("ws", np.array(0.01, np.float32)), ("wzp", np.array(0, np.int8)),
        ("wq", rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)), ("zero", np.array(0, np.int64))]]
    pad_inputs = ["input", "pads"]
    if value is not None:
        inits.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
        pad_inputs.append("value")
    # a large constant-shape ConstantOfShape (output 1x4x64x64) added to the result: must not be folded
    inits.append(numpy_helper.from_array(np.array([1, 4, 64, 64], np.int64), "big_shape"))
    nodes = [helper.make_node("Pad", pad_inputs, ["padded"], mode=mode),
             helper.make_node("QuantizeLinear", ["padded", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["x"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
             helper.make_node("Add", ["y", "big"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mode, value, moved", [("constant", None, True), ("constant", 0.0, True),
                                                ("constant", 1.0, False), ("reflect", None, False)])
def test_only_zero_constant_pads_move_behind_qdq_and_results_do_not_change(tmp_path, mode, value, moved):
    from lowbit.export.optimize import clean_onnx
    from lowbit.export.runtime import make_session

    raw = _pad_qdq_conv(mode, value)
    clean = clean_onnx(raw)
    ops = Counter(n.op_type for n in clean.graph.node)
    assert ops["Pad"] == (0 if moved else 1) and ops["ConstantOfShape"] == 1
    conv = next(n for n in clean.graph.node if n.op_type == "Conv")
    assert [a.ints for a in conv.attribute if a.name == "pads"] == ([[1, 1, 1, 1]] if moved else [])
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    outs = []
    for name, model in (("raw", raw), ("clean", clean)):
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        outs.append(make_session(tmp_path / f"{name}.onnx").run(None, {"input": x})[0])
    np.testing.assert_array_equal(outs[0], outs[1])
