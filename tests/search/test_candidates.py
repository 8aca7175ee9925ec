"""CandidateBuilder gives exactly lowbit.quantize's model for every recipe while calibrating each tensor once."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.search.candidates import CandidateBuilder, layer_pattern, quantized_layers
from lowbit.transforms.recipe import LayerRule, pattern_matches


def _recipes(coarse):
    r = lowbit.preset("int8")
    a16 = replace(r.default_input, bits=16, calibrator="minmax")
    return [
        r, r.keep_float("res_conv1"), r.keep_float("add", "fc"), r.keep_float("pool"),
        r.with_rules(LayerRule("down_conv", replace(r.default_weight, bits=4), a16)),
        r.with_calibrator("entropy").keep_float("conv1"), coarse.keep_float("conv1", "res_conv2"),
    ]


def test_built_candidates_equal_quantize_bit_for_bit(digits, coarse):
    model, calib, x, _ = digits
    builder = CandidateBuilder(model, calib, calib[:1])
    for recipe in _recipes(coarse):
        built = builder.build(recipe)
        ref = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
        with torch.no_grad():
            assert torch.equal(built(x), ref(x)), recipe
        assert dict(built.lowbit_info.float_layers) == dict(ref.lowbit_info.float_layers)


def test_each_tensor_and_spec_is_calibrated_once(digits):
    model, calib, _, _ = digits
    builder = CandidateBuilder(model, calib, calib[:1])
    r = lowbit.preset("int8")
    builder.build(r)
    for recipe in (r.keep_float("conv1"), r.keep_float("fc", "add"), r):  # subsets of the same tensors
        builder.build(recipe)
    assert builder.calibration_passes == 1
    builder.build(r.with_calibrator("minmax"))  # a new spec needs a new pass
    assert builder.calibration_passes == 2


def test_forward_loop_calibration_data_is_supported(digits):
    model, calib, x, _ = digits
    batches = list(torch.split(calib, 32))

    def loop(m):
        for b in batches:
            m(b)

    recipe = lowbit.preset("int8").keep_float("res_conv1")
    built = CandidateBuilder(model, loop, calib[:1]).build(recipe)
    ref = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
    with torch.no_grad():
        assert torch.equal(built(x), ref(x))


def test_empty_calibration_data_is_refused(digits):
    model, calib, _, _ = digits
    with pytest.raises(ValueError, match="empty"):
        CandidateBuilder(model, calib[:0], calib[:1]).build(lowbit.preset("int8"))


@pytest.mark.parametrize("name", ["fc", "blocks.0.conv", "a[1]", "w*x", "type:odd", "re:odd"])
def test_layer_pattern_matches_exactly_that_name(name):
    pat = layer_pattern(name)
    assert pattern_matches(pat, name, "Conv2d")
    for other in (name + "x", "x" + name, name.replace(".", "_") + "_"):
        assert not pattern_matches(pat, other, "Conv2d")


def test_quantized_layers_need_a_prepared_model(digits):
    model, calib, _, _ = digits
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    assert [n for n, _ in quantized_layers(q)] == ["conv1", "res_conv1", "res_conv2", "add", "down_conv", "pool", "fc"]
    with pytest.raises(ValueError, match="lowbit_info"):
        quantized_layers(model)
