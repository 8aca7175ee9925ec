"""Simulation error of every quantized activation: call order, batch invariance, independent references,
and the pairing with the exported graph's QuantizeLinear nodes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import lowbit
from lowbit.nn import TensorQuantizer
from lowbit.analysis import metrics
from lowbit.analysis.tensorwise import activation_quantizers, match_by_qparams, quantized_activation_errors
from lowbit.core import quantize_dequantize
from lowbit.analysis.onnx_tensors import quantized_tensors
from lowbit.nn import QuantLayerMixin


def test_quantizers_are_activations_only(qdigits):
    q, _ = qdigits
    acts = activation_quantizers(q)
    weights = {id(m.weight_quantizer) for m in q.modules() if isinstance(m, QuantLayerMixin)}
    assert acts and all(id(a) not in weights and a.is_active for a in acts)


def test_errors_against_independent_references(qdigits, digits):
    q, calib = qdigits
    x = calib[:40]
    errors, output = quantized_activation_errors(q, x, batch_size=16)
    first = q.get_submodule("lowbit_act")  # the graph's activation quantizers
    own = [m for m in first.children() if isinstance(m, TensorQuantizer)]  # not the Requantize re-applications
    assert errors[0].quantizer == "conv1.input_quantizer" and len(errors) == len(own)
    # the model input is quantized first: its error is plain fake-quant of x
    qin = next(m for m in activation_quantizers(q) if m.qname == "conv1.input_quantizer")
    ref = quantize_dequantize(x, qin.scale, qin.zero_point, qin.spec.qmin, qin.spec.qmax)
    assert errors[0].stats.sqnr_db() == pytest.approx(metrics.sqnr_db(x, ref), rel=1e-9)
    # the output: the float model vs the quantized one, on all samples at once
    model = digits[0]
    with torch.no_grad():
        expect = metrics.sqnr_db(model(x), q(x))
    assert output.sqnr_db() == pytest.approx(expect, rel=1e-6)
    assert all(q.enabled for q in activation_quantizers(q))  # switches restored


def test_batches_do_not_change_the_figures(qdigits):
    q, calib = qdigits
    x = calib[:24]
    one, out_one = quantized_activation_errors(q, x, batch_size=24)
    many, out_many = quantized_activation_errors(q, x, batch_size=5)
    assert [e.quantizer for e in one] == [e.quantizer for e in many]
    for a, b in zip(one, many):
        assert a.stats.n == b.stats.n and a.stats.sqnr_db() == pytest.approx(b.stats.sqnr_db(), rel=1e-9)
    assert out_one.sqnr_db() == pytest.approx(out_many.sqnr_db(), rel=1e-9)
    with pytest.raises(ValueError, match="batch_size 0"):
        quantized_activation_errors(q, x, batch_size=0)


def test_call_order_is_the_graph_order_of_quantizelinear(qdigits, tmp_path):
    q, calib = qdigits
    path = lowbit.export_onnx(copy.deepcopy(q), calib[:1], tmp_path / "m.onnx", check_parity=False)
    tensors = quantized_tensors(onnx.load(str(path)))
    errors, _ = quantized_activation_errors(q, calib[:4])
    qparams = [(t.scale, t.zero_point) for t in tensors]
    assert match_by_qparams(errors, qparams)
    assert not match_by_qparams(errors, qparams[:-1])
    assert not match_by_qparams(errors, qparams[1:] + qparams[:1])  # shifted by one
    bumped = [(np.asarray(s) * np.float32(1.0001), z) for s, z in qparams]
    assert not match_by_qparams(errors, bumped)
