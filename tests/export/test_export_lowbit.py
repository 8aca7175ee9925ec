"""Low-bit ONNX export: int4 / uint4 packing, blocked (per-group) DequantizeLinear, opset choice, what ONNX
Runtime executes, parity with the simulation (ONNX Runtime and onnx.reference) and the size on disk."""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import lowbit
from lowbit import PerChannel, PerGroup, PerTensor, QuantSpec, Recipe
from lowbit.export.onnx_int4 import packed_tensor, resolve_opset
from lowbit.export.runtime import make_session, optimized_op_types, parity, run_session
from lowbit.nn import QuantLayerMixin

UINT8_ACT = lowbit.preset("int8").default_input
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"  # ONNX Runtime's level for the MatMulNBits it fuses


class ConvNet(nn.Module):
    """Two convolutions and a classifier whose input dimension (32) holds whole groups of 4, 8, 16 or 32."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.flat(self.pool(x)))


class TanhMLP(nn.Module):
    """Linear layers separated by tanh (a ReLU would let ONNX Runtime fuse Gemm+Relu before MatMulNBits)."""

    def __init__(self, dims=(128, 256, 64)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.tanh(x))
        return x


def _recipe(weight: QuantSpec, act: bool) -> Recipe:
    return Recipe(default_weight=weight, default_input=UINT8_ACT if act else None)


def _export(model, calib, recipe, path, **kwargs):
    q = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
    lowbit.export_onnx(q, calib[:1], path, check_parity=False, **kwargs)
    return q, onnx.load(str(path))


def _layers(q):
    return {m.layer_name: m for m in q.modules() if isinstance(m, QuantLayerMixin)}


def _weight_dq(proto, layer_name):
    """The DequantizeLinear that feeds ``layer_name``'s Conv / Gemm / MatMul weight input."""
    prod = {o: n for n in proto.graph.node for o in n.output}
    op = next(n for n in proto.graph.node if n.name.startswith(f"/{layer_name}/")
              and n.op_type in ("Conv", "Gemm", "MatMul"))
    return prod[op.input[1]], op


def _value(proto, name):
    inits = {t.name: t for t in proto.graph.initializer}
    if name in inits:
        return inits[name]
    return next(n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == name)


def _attr(node, name, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _optimized_nodes(path, **config):
    """Nodes of the graph ONNX Runtime executes after optimisation (optionally with session config entries)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return list(onnx.load(so.optimized_model_filepath).graph.node)


def _naive_pack(codes) -> bytes:
    """Two 4-bit two's-complement nibbles per byte, the first element in the low nibble (ONNX int4 layout)."""
    flat = [int(c) & 0xF for c in np.asarray(codes).ravel()]
    if len(flat) % 2:
        flat.append(0)
    return bytes(flat[i] | (flat[i + 1] << 4) for i in range(0, len(flat), 2))


@settings(max_examples=60, deadline=None)
@given(signed=st.booleans(), shape=st.lists(st.integers(1, 7), min_size=0, max_size=3), seed=st.integers(0, 2**16))
def test_packing_matches_a_naive_nibble_packer(signed, shape, seed):
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = np.random.default_rng(seed).integers(lo, hi + 1, size=shape).astype(np.int8 if signed else np.uint8)
    t = packed_tensor("w", codes, signed)
    assert t.data_type == (onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4)
    assert list(t.dims) == list(codes.shape)
    assert t.raw_data == _naive_pack(codes) and len(t.raw_data) == (codes.size + 1) // 2
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int64), codes.astype(np.int64))


def test_packing_refuses_codes_outside_four_bits():
    with pytest.raises(ValueError, match="w: codes in \\[0, 8\\] do not fit int4"):
        packed_tensor("w", np.array([0, 8], dtype=np.int8), True)
    with pytest.raises(ValueError, match="do not fit uint4"):
        packed_tensor("w", np.array([-1, 3], dtype=np.int8), False)


@pytest.fixture(scope="module")
def calib():
    return torch.rand(32, 3, 12, 12)


def test_opset_is_chosen_from_the_weights(calib):
    model = ConvNet().eval()
    int8 = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    w4 = lowbit.quantize(model, calib, _recipe(QuantSpec(bits=4, granularity=PerChannel(0)), True), calib[:1],
                         show_progress=False)
    rule = lowbit.LayerRule("fc", QuantSpec(bits=8, granularity=PerGroup(8, 1)), UINT8_ACT)
    grouped = lowbit.quantize(model, calib, lowbit.preset("int8").with_rules(rule), calib[:1], show_progress=False)
    assert resolve_opset(int8, None) == 17 and resolve_opset(w4, None) == 21 and resolve_opset(grouped, None) == 21
    assert resolve_opset(w4, 17) == 17  # int8 containers, below
    with pytest.raises(ValueError, match="layer fc: per-group weights need opset >= 21 .*got opset 20"):
        resolve_opset(grouped, 20)
    with pytest.raises(ValueError, match="opset 22 is not supported"):
        resolve_opset(int8, 22)


# (weight spec, activations quantized)
CASES = {
    "w4-per-channel": (QuantSpec(bits=4, granularity=PerChannel(0)), True),
    "w4-per-channel-weight-only": (QuantSpec(bits=4, granularity=PerChannel(0)), False),
    "uint4-asym-per-channel": (QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerChannel(0)), True),
    "w3-per-tensor": (QuantSpec(bits=3, granularity=PerTensor()), True),
    "w2-per-channel-weight-only": (QuantSpec(bits=2, granularity=PerChannel(0)), False),
    "w4-group8": (QuantSpec(bits=4, granularity=PerGroup(8, 1)), True),
    "uint4-asym-group4-weight-only": (
        QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerGroup(4, 1)), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_low_bit_weights_are_packed_and_run_on_onnxruntime(case, calib, tmp_path):
    spec, act = CASES[case]
    q, proto = _export(ConvNet().eval(), calib, _recipe(spec, act), tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 21)] and proto.ir_version >= 10
    blocked = isinstance(spec.granularity, PerGroup)
    for name, layer in _layers(q).items():
        dq, op = _weight_dq(proto, name)
        codes = layer.weight_quantizer.quantize_codes(layer.weight).numpy()
        src = _value(proto, dq.input[0]) if dq.input[0] in {t.name for t in proto.graph.initializer} else None
        if act and not blocked:  # int4 on disk, Cast to int8 so ONNX Runtime fuses its integer kernel
            cast = next(n for n in proto.graph.node if dq.input[0] in n.output)
            wide = onnx.TensorProto.INT8 if spec.signed else onnx.TensorProto.UINT8
            assert cast.op_type == "Cast" and _attr(cast, "to") == wide
            src = _value(proto, cast.input[0])
        assert src.data_type == (onnx.TensorProto.INT4 if spec.signed else onnx.TensorProto.UINT4)
        stored = numpy_helper.to_array(src).astype(np.int64)
        if op.op_type == "MatMul":  # a blocked Linear weight is stored transposed, blocked along K (axis 0)
            stored, axis = stored.T, 1 - _attr(dq, "axis")
        else:
            axis = _attr(dq, "axis")
        np.testing.assert_array_equal(stored, codes)
        assert len(src.raw_data) == (codes.size + 1) // 2
        assert _attr(dq, "block_size") == (spec.granularity.size if blocked else None)
        assert axis == (None if isinstance(spec.granularity, PerTensor) else (1 if blocked else 0))
    x = torch.rand(16, 3, 12, 12)
    with torch.no_grad():
        sim = q(x)
    ref = torch.from_numpy(ReferenceEvaluator(proto).run(None, {"input": x.numpy()})[0])
    assert parity(sim, ref).fraction_within_step == 1.0
    res = parity(sim, run_session(make_session(tmp_path / "m.onnx"), x))
    assert res.ok and res.fraction_within_step == 1.0, res
    ops = optimized_op_types(tmp_path / "m.onnx")
    assert ops["QLinearConv"] == (2 if act and not blocked else 0)


def test_explicit_opset_17_keeps_int8_containers_and_integer_kernels(calib, tmp_path):
    spec = QuantSpec(bits=4, granularity=PerChannel(0))
    q, proto = _export(ConvNet().eval(), calib, _recipe(spec, True), tmp_path / "m.onnx", opset=17)
    assert proto.opset_import[0].version == 17
    assert all(t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in proto.graph.initializer)
    dq, _ = _weight_dq(proto, "conv2")
    codes = numpy_helper.to_array(_value(proto, dq.input[0]))
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, q.conv2.weight_quantizer.quantize_codes(q.conv2.weight).numpy())
    assert optimized_op_types(tmp_path / "m.onnx")["QLinearConv"] == 2
    with pytest.raises(ValueError, match="layer fc: per-group weights need opset >= 21"):
        lowbit.export_onnx(lowbit.quantize(ConvNet().eval(), calib, lowbit.preset("int8").with_rules(
            lowbit.LayerRule("fc", QuantSpec(bits=4, granularity=PerGroup(8, 1)), None)), calib[:1],
            show_progress=False), calib[:1], tmp_path / "g.onnx", opset=17)
    assert not (tmp_path / "g.onnx").exists()


def test_digits_cnn_w4_per_channel_runs_integer_kernels_in_parity(digits, tmp_path):
    model, calib, x_eval, _ = digits
    recipe = replace(lowbit.preset("int8"), default_weight=QuantSpec(bits=4, granularity=PerChannel(0)))
    q, _ = _export(model, calib, recipe, tmp_path / "d.onnx")
    with torch.no_grad():
        sim = q(x_eval)
    res = parity(sim, run_session(make_session(tmp_path / "d.onnx"), x_eval))
    assert res.ok and res.fraction_within_step == 1.0, res
    assert optimized_op_types(tmp_path / "d.onnx")["QLinearConv"] == 4


@pytest.fixture(scope="module")
def mlp_g32(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    calib = torch.randn(32, 128)
    q, proto = _export(TanhMLP().eval(), calib, _recipe(QuantSpec(bits=4, granularity=PerGroup(32, 1)), False), path)
    return q, proto, path


def test_weight_only_groups_become_matmulnbits(mlp_g32):
    q, proto, path = mlp_g32
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "MatMul", "Add", "Tanh",
                                                     "DequantizeLinear", "MatMul", "Add"]
    nbits = [n for n in _optimized_nodes(path) if n.op_type == "MatMulNBits"]
    assert [(_attr(n, "K"), _attr(n, "N"), _attr(n, "bits"), _attr(n, "block_size")) for n in nbits] == [
        (128, 256, 4, 32), (256, 64, 4, 32)]
    # the engine's default for the MatMulNBits it fuses: int8 activations (accuracy_level 4)
    assert {_attr(n, "accuracy_level") for n in nbits} == {4}
    fp32 = _optimized_nodes(path, **{ACCURACY_KEY: "1"})
    assert {_attr(n, "accuracy_level") for n in fp32 if n.op_type == "MatMulNBits"} == {1}


def test_matmulnbits_in_float_matches_the_simulation(mlp_g32):
    q, _, path = mlp_g32
    x = torch.randn(64, 128)
    so = ort.SessionOptions()
    so.add_session_config_entry(ACCURACY_KEY, "1")
    eng = run_session(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), x)
    with torch.no_grad():
        sim = q(x)
    torch.testing.assert_close(eng, sim, rtol=0, atol=1e-5)


def test_matmulnbits_default_error_is_bounded_by_int8_activation_rounding(tmp_path):
    """ONNX Runtime's default MatMulNBits rounds each activation to int8 (``s = amax / 127`` over at most a row):
    ``|Δy[m, n]| ≤ amax(x[m]) / 254 · Σ_k |Ŵ[n, k]|`` — the engine deviates from a float simulation by that."""
    calib = torch.randn(32, 256)
    q, _ = _export(nn.Sequential(nn.Linear(256, 64)).eval(), calib,
                   _recipe(QuantSpec(bits=4, granularity=PerGroup(64, 1)), False), tmp_path / "l.onnx")
    layer = _layers(q)["0"]
    x = torch.randn(64, 256)
    eng = run_session(make_session(tmp_path / "l.onnx"), x).double()
    w_hat = layer.weight_quantizer(layer.weight).detach().double()
    sim = x.double() @ w_hat.T + layer.bias.detach().double()
    bound = x.abs().amax(dim=1, keepdim=True).double() / 254 * w_hat.abs().sum(dim=1)[None, :]
    assert ((eng - sim).abs() <= bound + 1e-5).all()


def test_groups_of_a_linear_on_3d_inputs_drop_the_transpose(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32, bias=False)).eval()
    calib = torch.randn(8, 5, 64)
    recipe = _recipe(QuantSpec(bits=4, granularity=PerGroup(16, 1)), False)
    q, proto = _export(model, calib, recipe, tmp_path / "t.onnx")
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "MatMul"]
    x = torch.randn(4, 5, 64)
    with torch.no_grad():
        sim = q(x)
    torch.testing.assert_close(torch.from_numpy(ReferenceEvaluator(proto).run(None, {"input": x.numpy()})[0]), sim,
                               rtol=0, atol=1e-5)
    assert optimized_op_types(tmp_path / "t.onnx")["MatMulNBits"] == 1


def test_packed_groups_shrink_an_mlp_on_disk(tmp_path):
    """Group 128 with float32 scales: 4 + 32 / 128 = 4.25 bits per weight, so ≥ 7x smaller than FP32."""
    model = TanhMLP((512, 512, 512)).eval()
    calib = torch.randn(16, 512)
    recipe = _recipe(QuantSpec(bits=4, granularity=PerGroup(128, 1)), False)
    q, proto = _export(model, calib, recipe, tmp_path / "q.onnx")
    lowbit.export_onnx(q, calib[:1], tmp_path / "f.onnx", float_model=True)
    ratio = os.path.getsize(tmp_path / "f.onnx") / os.path.getsize(tmp_path / "q.onnx")
    assert ratio >= 7.0, ratio
    packed = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4 and len(t.dims) == 2
              and t.dims[0] == 512]
    assert sorted(len(t.raw_data) for t in packed) == [512 * 512 // 2] * 2


@pytest.mark.slow
def test_efficientnet_all_4bit_weights_is_7x_smaller_than_fp32(tmp_path):
    from lowbit.zoo import load_data, load_model

    zm, x = load_model("efficientnet-lite0"), load_data("photos").calib[:4]
    q, _ = _export(zm.model, x, _recipe(QuantSpec(bits=4, granularity=PerChannel(0)), False), tmp_path / "w4.onnx")
    lowbit.export_onnx(q, x[:1], tmp_path / "fp32.onnx", float_model=True)
    ratio = os.path.getsize(tmp_path / "fp32.onnx") / os.path.getsize(tmp_path / "w4.onnx")
    assert ratio >= 7.0, ratio  # measured 7.20 (parity of this form: test_low_bit_weights_are_packed_and_run_...)
