"""prepare_ / convert_: where quantizers sit in the traced graph, recipe rules, and the module-swap fallback."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.fx as fx
from torch import nn

import lowbit
from lowbit.nn import Requantize, QuantConv2d, QuantLinear, QuantState, TensorQuantizer


class Net(nn.Module):
    """Residual add, concat, matmul, ReLU6, pools, Flatten and ZeroPad2d in one small graph."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.pad = nn.ZeroPad2d(1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()
        self.conv4 = nn.Conv2d(16, 8, 1)
        self.mp = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.conv2(self.pad(a))
        c = self.conv3(a)
        s = self.relu(b + c)
        cat = torch.cat([s, a], 1)
        d = self.mp(self.conv4(cat))
        f = self.flat(self.gap(d))
        g = self.fc(f)
        m = g.unsqueeze(2) @ f.unsqueeze(1)
        return self.head(m.mean(1))


def _model():
    torch.manual_seed(0)
    return Net().eval()


def _act_quantizers(model):
    return {n: m for n, m in model.named_modules() if n.startswith("lowbit_act.") and isinstance(m, TensorQuantizer)}


def _nodes(model):
    return {n.name: n for n in model.graph.nodes}


def _quant_nodes_on(model, src_name):
    """call_module nodes of activation quantizers that read the node named ``src_name``."""
    return [
        n for n in model.graph.nodes
        if n.op == "call_module" and str(n.target).startswith("lowbit_act.")
        and isinstance(model.get_submodule(n.target), TensorQuantizer)
        and any(isinstance(a, fx.Node) and a.name == src_name for a in n.args)
    ]


@pytest.mark.parametrize("target", ["int8", "tensorrt-int8"])
def test_one_shared_quantizer_per_tensor(target):
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    # node names below are torch.fx's (``act1``, ``flat``); the torch.export path is compared with this one
    # in test_export_capture_places_the_same_quantizers_as_fx
    q = lowbit.prepare_(copy.deepcopy(model), lowbit.preset(target), x[:1], capture="fx")
    info = q.lowbit_info
    assert info.traced and info.folded_bn == ["bn1"]
    assert info.float_layers == []
    assert {k: v for k, v in info.layer_kinds.items()} == {
        "conv1": "Conv2d", "conv2": "Conv2d", "conv3": "Conv2d", "conv4": "Conv2d", "add": "add", "cat": "cat",
        "gap": "pool", "fc": "Linear", "head": "Linear", "matmul": "matmul",
    }  # a max pool is no site: it commutes with the quantizer (see below)
    acts = _act_quantizers(q)
    # the ReLU6 output feeds conv2 (through the zero pad), conv3 and the concat: ONE quantizer
    shared = [m for m in acts.values() if m.consumers == ["cat", "conv2", "conv3"]]
    assert len(shared) == 1
    sq = shared[0]
    assert sq.bounds == (0.0, 6.0)
    if target == "int8":
        assert sq.spec.signed is False and sq.spec.symmetric is True  # unsigned, zero-point 0
    else:
        assert sq.spec.signed is True and sq.spec.symmetric is True
    name = next(n for n, m in acts.items() if m is sq)
    assert info.layer_inputs["conv2"] == [name] and info.layer_inputs["conv3"] == [name]
    assert name in info.layer_inputs["cat"] and len(info.layer_inputs["cat"]) == 2
    # graph: ReLU6 → Q → {pad → conv2, conv3, cat}; exactly one quantizer reads the ReLU6 output
    nodes = _nodes(q)
    qn = _quant_nodes_on(q, "act1")
    assert len(qn) == 1 and set(u.name for u in qn[0].users) == {"pad", "conv3", "cat"}
    assert nodes["pad"].args[0] is qn[0] and nodes["conv2"].args[0] is nodes["pad"]
    # Flatten is pass-through: fc's quantizer sits on the pool output, before the flatten
    flat_in = nodes["flat"].args[0]
    assert flat_in.op == "call_module" and str(flat_in.target).startswith("lowbit_act.")
    assert flat_in.args[0] is nodes["gap"]
    assert info.layer_inputs["fc"] == [str(flat_in.target)]
    # two-input ops get one quantizer per input, pools one
    for site in ("add", "matmul"):
        assert len(info.layer_inputs[site]) == 2 and len(set(info.layer_inputs[site])) == 2
    for site in ("gap", "conv1", "conv4", "head"):
        assert len(info.layer_inputs[site]) == 1
    # the max pool reads conv4's quantized output; for ONNX Runtime the same quantizer is re-applied after it
    # (nn.Requantize), so the engine runs the pool on the codes
    mp_in = nodes["mp"].args[0]
    assert mp_in.op == "call_module" and str(mp_in.target).startswith("lowbit_act.") and mp_in.args[0] is nodes["conv4"]
    gap_in = nodes["gap"].args[0]
    if target == "int8":
        assert isinstance(q.get_submodule(gap_in.target), Requantize) and gap_in.args[0] is nodes["mp"]
        assert q.get_submodule(gap_in.target).source is q.get_submodule(mp_in.target)
    else:
        assert gap_in is nodes["mp"]
    # no tensor is quantized twice
    for node in q.graph.nodes:
        if node.op != "output":
            assert len(_quant_nodes_on(q, node.name)) <= 1, node.name
    for name_ in ("conv1", "conv2", "conv3", "conv4"):
        assert type(q.get_submodule(name_)) is QuantConv2d
    for name_ in ("fc", "head"):
        assert type(q.get_submodule(name_)) is QuantLinear
    # not calibrated yet: same function as the float model
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", ["int8", "tensorrt-int8"])
def test_export_capture_places_the_same_quantizers_as_fx(target):
    model = _model()
    x = torch.randn(8, 3, 8, 8)
    by_path = {}
    for how in ("export", "fx"):
        q = lowbit.prepare_(copy.deepcopy(model), lowbit.preset(target), x[:1], capture=how)
        lowbit.calibrate(q, [x])
        lowbit.convert_(q)
        by_path[how] = q
    ex, fx_ = by_path["export"], by_path["fx"]
    assert ex.lowbit_info.capture_path == "torch.export" and fx_.lowbit_info.capture_path == "torch.fx"
    assert ex.lowbit_info.folded_bn == ["bn1"] and ex.lowbit_info.float_layers == []
    kinds = lambda q: sorted(q.lowbit_info.layer_kinds.values())  # noqa: E731
    assert kinds(ex) == kinds(fx_)
    layers = {n for n, k in fx_.lowbit_info.layer_kinds.items() if k in ("Conv2d", "Linear", "pool")}
    assert layers <= set(ex.lowbit_info.layer_kinds)  # modules and pooling modules keep their names
    specs = lambda q: sorted(repr((m.spec.signed, m.spec.symmetric, m.bounds)) for m in _act_quantizers(q).values())  # noqa: E731
    assert specs(ex) == specs(fx_)
    with torch.no_grad():
        torch.testing.assert_close(ex(x), fx_(x), rtol=0, atol=0)


def test_calibrated_relu6_quantizer_uses_bound_and_feeds_bias_grid():
    model = _model()
    x = torch.randn(16, 3, 8, 8) * 20  # saturates ReLU6
    recipe = lowbit.preset("int8").with_calibrator("minmax")
    q = lowbit.prepare_(copy.deepcopy(model), recipe, x[:1])
    lowbit.calibrate(q, x, show_progress=False)
    lowbit.convert_(q)
    sq = next(m for m in _act_quantizers(q).values() if m.consumers == ["cat", "conv2", "conv3"])
    assert sq.state is QuantState.FROZEN
    assert sq.scale.item() == pytest.approx(6.0 / 255, rel=1e-6) and sq.zero_point.item() == 0
    for name in ("conv2", "conv3"):
        layer = q.get_submodule(name)
        assert layer.effective_input_quantizer() is sq
        torch.testing.assert_close(layer.bias_qparams()[0], sq.scale * layer.weight_quantizer.scale, rtol=0, atol=0)
    frozen = [m for _, m in q.named_modules() if isinstance(m, TensorQuantizer) and m.spec is not None]
    assert frozen and all(m.state is QuantState.FROZEN for m in frozen)
    with torch.no_grad():
        out, ref = q(x[:4]), model(x[:4])
    assert not torch.equal(out, ref)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_recipe_rules_keep_layers_float():
    model = _model()
    x = torch.randn(2, 3, 8, 8)
    recipe = lowbit.preset("int8").keep_float("co*3", "re:fc|head", "type:matmul", "type:add")
    q = lowbit.prepare_(copy.deepcopy(model), recipe, x[:1])
    info = q.lowbit_info
    kept = dict(info.float_layers)
    assert set(kept) == {"conv3", "fc", "head", "matmul", "add"}
    assert set(kept.values()) == {"kept in float by a recipe rule"}
    assert type(q.conv3) is nn.Conv2d and type(q.fc) is nn.Linear and type(q.head) is nn.Linear
    assert type(q.conv2) is QuantConv2d and type(q.conv4) is QuantConv2d
    for name in kept:
        assert name not in info.layer_inputs and name not in info.layer_kinds
    sq = [m for m in _act_quantizers(q).values() if m.bounds == (0.0, 6.0)]
    assert len(sq) == 1 and sq[0].consumers == ["cat", "conv2"]
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-5)


def test_float_functions_are_reported():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.conv2 = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.conv2(torch.sigmoid(y)) + torch.nn.functional.gelu(y)

    x = torch.randn(1, 2, 3, 3)
    ort = lowbit.prepare_(Gate().eval(), lowbit.preset("int8"), x)
    assert ort.lowbit_info.layer_kinds["sigmoid"] == "sigmoid"  # QLinearSigmoid on ONNX Runtime (it feeds conv2)
    assert ("gelu", "gelu: no int8 kernel, runs in float") in ort.lowbit_info.float_layers
    # the final add only feeds the output: an integer Add would add a rounding step and save nothing
    assert any(name == "add" and why.startswith("add: its result only feeds float ops")
               for name, why in ort.lowbit_info.float_layers)
    trt = lowbit.prepare_(Gate().eval(), lowbit.preset("tensorrt-int8"), x)
    assert ("sigmoid", "sigmoid: no int8 kernel, runs in float") in trt.lowbit_info.float_layers


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.features(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y + self.conv2(y)
        return self.fc(torch.mean(y * 2, dim=(2, 3)))


def test_untraceable_model_falls_back_to_module_swap(caplog):
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(8, 3, 6, 6) + 0.1
    ref = model(x)
    with caplog.at_level(logging.WARNING, logger="lowbit"):  # torch.fx only: torch.export specialises (below)
        q = lowbit.prepare_(copy.deepcopy(model), lowbit.preset("int8"), x[:1], capture="fx")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "fell back to module swap" in r.getMessage()]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "add (x1)" in msg and "mul (x1)" in msg and "TraceError" in msg
    info = q.lowbit_info
    assert not info.traced and not isinstance(q, fx.GraphModule)
    assert info.folded_bn == ["features.1"]
    assert {n.split(" ")[0] for n, why in info.float_layers if "functional op" in why} == {"add", "mul"}
    assert type(q.features[0]) is QuantConv2d and type(q.conv2) is QuantConv2d and type(q.fc) is QuantLinear
    assert info.layer_inputs["conv2"] == ["conv2.input_quantizer"]
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)  # BN folded, nothing quantized yet
    lowbit.calibrate(q, x, show_progress=False)
    lowbit.convert_(q)
    for layer in (q.features[0], q.conv2, q.fc):
        assert layer.input_quantizer.is_active and layer.weight_quantizer.is_active
        assert layer.effective_input_quantizer() is layer.input_quantizer
    with torch.no_grad():
        out = q(x)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05 * ref.abs().max().item())


def test_prepare_refuses_training_model():
    with pytest.raises(ValueError, match="eval-mode"):
        lowbit.prepare_(Net().train(), lowbit.preset("int8"))


def test_convert_before_calibrate_is_refused():
    q = lowbit.prepare_(_model(), lowbit.preset("int8"), torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="was never calibrated"):
        lowbit.convert_(q)


def test_data_dependent_branch_is_specialised_and_named():
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(8, 3, 6, 6) + 0.1  # x.sum() > 0: the residual branch is taken
    q = lowbit.prepare_(copy.deepcopy(model), lowbit.preset("int8"), x[:1])
    info = q.lowbit_info
    assert info.capture_path == "torch.export" and isinstance(q, fx.GraphModule)
    assert "specialised to the example input" in info.capture and "if x.sum() > 0" in info.capture
    assert info.folded_bn == ["features.1"] and "conv2" in info.layer_kinds  # the branch taken
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-5)  # the branch taken, BN folded


def test_capture_paths_can_be_chosen_and_bad_choice_is_named():
    model = _model()
    x = torch.randn(1, 3, 8, 8)
    assert lowbit.prepare_(copy.deepcopy(model), lowbit.preset("int8"), x, capture="swap").lowbit_info.capture_path \
        == "module swap"
    with pytest.raises(ValueError, match="unknown capture 'jit'"):
        lowbit.prepare_(copy.deepcopy(model), lowbit.preset("int8"), x, capture="jit")
