"""Dynamic-quantization and MatMulNBits exports, run by ONNX Runtime and compared with the PyTorch simulation."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit import LayerRule, PerGroup, QuantSpec, Recipe
from lowbit.export.onnx_dynamic import check_parity_any, export_dynamic_onnx, run_onnx
from lowbit.export.onnx_matmul_nbits import export_nbits_onnx, pack_int4, unpack_int4
from lowbit.export.runtime import make_session, optimized_op_types
from lowbit.transforms.dynamic import dynamic_recipe, quantize_dynamic_
from lowbit.transforms.recipe import UINT8_ACT


def _ort(path, x):
    return run_onnx(make_session(path, threads=1), x)


def _float_matrices(path) -> list[tuple[int, ...]]:
    """Shapes of float matrices (2-D initializers or Constant nodes, no vector of scales) in the file."""
    proto = onnx.load(str(path))
    tensors = list(proto.graph.initializer)
    tensors += [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return [tuple(t.dims) for t in tensors if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) > 1]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_linear_runs_on_integer_kernels_and_matches_exactly(tmp_path, per_token, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32, bias=bias), nn.ReLU(), nn.Linear(32, 8, bias=bias)).eval()
    x = torch.randn(3, 10, 48) * torch.linspace(0.1, 6, 48)
    q = quantize_dynamic_(model, dynamic_recipe(per_token=per_token))
    path = export_dynamic_onnx(q, x[:1], tmp_path / "dyn.onnx", check_parity=False)
    with torch.no_grad():
        sim = q(x)
    torch.testing.assert_close(_ort(path, x), sim, rtol=1e-5, atol=1e-5)
    ops = optimized_op_types(path, threads=1)
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) + ops.get("MatMulInteger", 0) == 2
    assert _float_matrices(path) == []  # weights travel as int8 codes only


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.gru = nn.GRU(12, 12, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, ids):
        x, _ = self.lstm(self.emb(ids))
        x, _ = self.gru(x)
        return self.head(x)


def test_recurrent_model_with_token_ids_is_unrolled_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = Tagger().eval()
    ids = torch.randint(0, 40, (5, 6))
    q = quantize_dynamic_(copy.deepcopy(model), dynamic_recipe())
    path = export_dynamic_onnx(q, ids[:1], tmp_path / "tagger.onnx", check_parity=False)
    assert make_session(path).get_inputs()[0].type == "tensor(int64)"
    result = check_parity_any(q, path, ids, threads=1)
    assert result.ok, result
    assert _float_matrices(path) == []  # LSTM / GRU / Linear weights and the embedding table are all int8
    ops = optimized_op_types(path, threads=1)
    # 6 steps x (2 LSTM + 2 GRU products) + the head; the unrolled products run as integer kernels
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 6 * 4 + 1


def test_float_model_with_int64_inputs_exports_and_runs(tmp_path):
    model = Tagger().eval()
    ids = torch.randint(0, 40, (2, 6))
    path = export_dynamic_onnx(model, ids[:1], tmp_path / "fp32.onnx")
    with torch.no_grad():
        torch.testing.assert_close(_ort(path, ids), model(ids), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), k=st.integers(1, 70), block=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16))
def test_int4_packing_round_trips(n, k, block, seed):
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(codes, block)
    assert packed.dtype == torch.uint8 and packed.shape == (n, -(-k // block), block // 2)
    assert torch.equal(unpack_int4(packed, k), codes)
    # nibble layout: element 2j in the low nibble, 2j + 1 in the high nibble, stored as code + 8
    assert int(packed[0, 0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8 if k > 1 else 8) << 4)


def _w4_model(group: int):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    w4 = QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerGroup(group, axis=1))
    recipe = Recipe(w4, UINT8_ACT, rules=(LayerRule("re:.*", w4, None),))
    x = torch.randn(20, 96)
    return model, lowbit.quantize(model, x, recipe, x[:1], show_progress=False), x


@pytest.mark.parametrize("group", [32, 64])
def test_matmulnbits_export_matches_the_simulation_and_packs_the_weights(tmp_path, group):
    model, q, x = _w4_model(group)
    path = export_nbits_onnx(q, x[:1], tmp_path / "w4.onnx")
    fp32 = export_dynamic_onnx(model, x[:1], tmp_path / "fp32.onnx")
    with torch.no_grad():
        sim = q(x)
    torch.testing.assert_close(_ort(path, x), sim, rtol=1e-5, atol=1e-5)
    assert optimized_op_types(path, threads=1).get("MatMulNBits", 0) == 2
    assert _float_matrices(path) == []
    weights = 96 * 64 + 64 * 16
    saved = fp32.stat().st_size - path.stat().st_size
    assert saved > weights * 3  # 4 bytes per float weight became half a byte (+ one scale per group)
    with torch.no_grad():
        quant_err = float((sim - model(x)).abs().max())
    assert 0 < quant_err < 0.5


def test_matmulnbits_refuses_a_model_without_eligible_layers(tmp_path):
    x = torch.randn(4, 8)
    q = lowbit.quantize(nn.Sequential(nn.Linear(8, 4)).eval(), x, lowbit.preset("int8"), x[:1], show_progress=False)
    with pytest.raises(ValueError, match="4-bit signed symmetric per-group"):
        export_nbits_onnx(q, x[:1], tmp_path / "w4.onnx")
    assert not (tmp_path / "w4.onnx").exists()
    with torch.no_grad():
        assert np.isfinite(float(q(x).sum()))
