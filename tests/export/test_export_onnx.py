"""ONNX export: Q/DQ structure, integer initializers, what ONNX Runtime executes, float baseline, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit.export import onnx_static
from lowbit.export.runtime import make_session, optimized_op_types, parity, run_session
from lowbit.nn import QuantLayerMixin


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flat(self.pool(x)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    calib = torch.rand(64, 3, 12, 12)
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    out = tmp_path_factory.mktemp("export")
    int8 = lowbit.export_onnx(q, calib[:1], out / "model_int8.onnx")
    fp32 = lowbit.export_onnx(q, calib[:1], out / "model_fp32.onnx", float_model=True)
    return model, q, int8, fp32, out


def _consts(proto):
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _producer(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def _axis(node):
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def test_files_are_valid_and_nothing_else_is_left(exported):
    _, _, int8, fp32, out = exported
    assert sorted(os.listdir(out)) == ["model_fp32.onnx", "model_int8.onnx"]  # no temp files
    for path in (int8, fp32):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.producer_name == "lowbit"
    ops = {n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops


def test_weights_are_integer_constants_behind_dequantize(exported):
    _, q, int8, _, _ = exported
    proto = onnx.load(str(int8))
    consts, prod = _consts(proto), _producer(proto)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    layers = [q.conv1, q.conv2]
    assert len(convs) == 2
    for node, layer in zip(convs, layers):
        w_dq = prod[node.input[1]]
        assert w_dq.op_type == "DequantizeLinear" and _axis(w_dq) == 0
        codes = consts[w_dq.input[0]]
        assert codes.dtype == np.int8
        assert np.array_equal(codes, layer.weight_quantizer.quantize_codes(layer.weight).numpy())
        assert np.abs(codes).max() <= 2 ** (layer.weight_quantizer.spec.bits - 1)
        np.testing.assert_array_equal(consts[w_dq.input[1]], layer.weight_quantizer.scale.numpy())
        assert consts[w_dq.input[2]].dtype == np.int8 and not consts[w_dq.input[2]].any()
        b_dq = prod[node.input[2]]
        assert b_dq.op_type == "DequantizeLinear"
        b_codes = consts[b_dq.input[0]]
        assert b_codes.dtype == np.int32
        s_b = (layer.effective_input_quantizer().scale * layer.weight_quantizer.scale).numpy()
        np.testing.assert_array_equal(consts[b_dq.input[1]], s_b)
        np.testing.assert_array_equal(b_codes, np.round(layer.bias.detach().numpy() / s_b).astype(np.int32))
        # the activation feeding the conv is a Q→DQ pair with a scalar scale
        x_dq = prod[node.input[0]]
        assert x_dq.op_type == "DequantizeLinear" and prod[x_dq.input[0]].op_type == "QuantizeLinear"
        assert consts[x_dq.input[1]].shape == ()
    fc_ops = [n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(fc_ops) == 1 and prod[fc_ops[0].input[1]].op_type == "DequantizeLinear"


def test_onnxruntime_executes_integer_convolutions(exported):
    _, _, int8, fp32, _ = exported
    ops = optimized_op_types(int8)
    assert ops["QLinearConv"] == 2
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0
    assert optimized_op_types(fp32)["QLinearConv"] == 0


def test_engine_matches_simulation_and_float_export_matches_torch(exported):
    model, q, int8, fp32, _ = exported
    x = torch.rand(32, 3, 12, 12)
    with torch.no_grad():
        sim, ref = q(x), model(x)
    eng = run_session(make_session(int8), x)
    res = parity(sim, eng)
    assert res.ok and res.elements == 320
    torch.testing.assert_close(run_session(make_session(fp32), x), ref, rtol=0, atol=1e-4)


def test_per_tensor_weights_have_no_axis(tmp_path):
    torch.manual_seed(0)
    calib = torch.rand(16, 3, 12, 12)
    q = lowbit.quantize(SmallCNN().eval(), calib, lowbit.preset("int8-per-tensor"), calib[:1], show_progress=False)
    proto = onnx.load(str(lowbit.export_onnx(q, calib[:1], tmp_path / "m.onnx")))
    consts, prod = _consts(proto), _producer(proto)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    dq = prod[conv.input[1]]
    assert _axis(dq) is None and consts[dq.input[1]].shape == ()


def test_digits_parity_with_int8_preset(tmp_path, digits):
    model, calib, x_eval, _ = digits
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    path = lowbit.export_onnx(q, calib[:1], tmp_path / "digits_int8.onnx")
    with torch.no_grad():
        sim = q(x_eval)
    res = parity(sim, run_session(make_session(path), x_eval))
    assert res.ok, res
    assert res.fraction_within_step >= 0.999
    assert optimized_op_types(path)["QLinearConv"] == 4


def test_export_rejects_bad_arguments(exported, tmp_path):
    _, q, _, _, _ = exported
    x = torch.rand(1, 3, 12, 12)
    with pytest.raises(ValueError, match="opset 12 < 13"):
        lowbit.export_onnx(q, x, tmp_path / "a.onnx", opset=12)
    with pytest.raises(ValueError, match="unknown export target 'tflite'"):
        lowbit.export_onnx(q, x, tmp_path / "a.onnx", target="tflite")
    assert list(tmp_path.iterdir()) == []


def test_export_restores_model_state(exported):
    _, q, _, _, _ = exported
    mods = [m for m in q.modules() if isinstance(m, QuantLayerMixin)]
    assert mods and all(m.export_mode is False and "_export_tensors" not in m.__dict__ for m in mods)
    assert all(qq.enabled for _, qq in lowbit.transforms.prepare.quantizers(q) if qq.spec is not None)


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    onnx_static.atomic_write_bytes(target, b"old")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.onnx"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_static.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        onnx_static.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_quantize_leaves_the_float_model_alone(exported):
    model, q, _, _, _ = exported
    assert type(model.conv1) is nn.Conv2d and isinstance(model.bn1, nn.BatchNorm2d)  # quantize() used a copy
    assert q.conv1.weight is not model.conv1.weight
    assert not torch.equal(q.conv1.weight, model.conv1.weight)  # BN folded into the copy only


def test_int8_and_fp32_exports_share_tensor_names(exported):
    _, _, int8, fp32, _ = exported
    fp = onnx.load(str(fp32))
    fp_names = {i.name for i in fp.graph.input} | {o for n in fp.graph.node for o in n.output}
    q_inputs = [n.input[0] for n in onnx.load(str(int8)).graph.node if n.op_type == "QuantizeLinear"]
    # input, relu1, relu2, pool output, and the pool output again after Flatten (nn.Requantize: the Gemm fuses)
    assert len(q_inputs) == 5
    assert set(q_inputs) <= fp_names
