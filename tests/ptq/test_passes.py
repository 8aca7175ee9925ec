"""The pass pipeline: fixed order, recipes that name passes, and models that still export with parity."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.ptq import passes as pipeline
from lowbit.transforms.recipe import load_recipe


def test_passes_run_in_pipeline_order_whatever_the_listing():
    assert pipeline.ordered(["bias_correction", "adaround", "cle"]) == ["cle", "adaround", "bias_correction"]
    assert pipeline.ordered(("gptq",)) == ["gptq"]
    with pytest.raises(ValueError, match="name only one"):
        pipeline.ordered(["adaround", "gptq"])
    with pytest.raises(ValueError, match="unknown pass 'magic'"):
        pipeline.ordered(["magic"])


def test_recipe_yaml_names_passes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("passes: [cle, bias_correction, adaround]\n")
    recipe = load_recipe(path)
    assert recipe.passes == ("cle", "bias_correction", "adaround")
    assert load_recipe_from_text(tmp_path, recipe.to_yaml()).passes == recipe.passes


def load_recipe_from_text(tmp_path, text):
    p = tmp_path / "again.yaml"
    p.write_text(text)
    return load_recipe(p)


def _w4(recipe):
    return replace(recipe, default_weight=replace(recipe.default_weight, bits=4))


def _accuracy(q, x, y):
    with torch.no_grad():
        return float((q(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_w4_rounding_passes_recover_accuracy_and_export_with_parity(digits, rounding, tmp_path):
    model, calib, x, y = digits
    recipe = _w4(lowbit.preset("int8"))
    timings = {}
    rtn = lowbit.quantize(copy.deepcopy(model), calib, recipe, calib[:1], show_progress=False)
    q = pipeline.quantize(copy.deepcopy(model), calib, recipe.with_passes(rounding, "bias_correction"),
                          calib[:1], show_progress=False, timings=timings)
    assert set(timings) == {"calibrate", rounding, "bias_correction"}
    with torch.no_grad():
        fp = _accuracy(model, x, y)
    assert _accuracy(q, x, y) >= _accuracy(rtn, x, y)
    assert _accuracy(q, x, y) >= fp - 0.005  # the goal: W4A8 within 0.5 points of FP32
    # the learned weights sit on the frozen grid: the exported integer model matches the simulation
    path = lowbit.export_onnx(q, calib[:1], tmp_path / "m.onnx", check_parity=False)
    result = lowbit.check_onnx_parity(q, path, x[:64])
    assert result.ok, result


def test_cle_runs_before_calibration_and_keeps_the_float_model(digits):
    model, calib, x, _ = digits
    timings = {}
    q = pipeline.quantize(copy.deepcopy(model), calib, lowbit.preset("int8").with_passes("cle"), calib[:1],
                          show_progress=False, timings=timings)
    assert list(timings) == ["cle", "calibrate"]
    from lowbit.export.onnx_static import quantizers_disabled

    with torch.no_grad(), quantizers_disabled(q):
        torch.testing.assert_close(q(x[:32]), model(x[:32]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_weight_only_per_group_int4_beats_round_to_nearest(rounding):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    x = torch.randn(256, 64)
    w4 = lowbit.QuantSpec(bits=4, signed=True, symmetric=True, granularity=lowbit.PerGroup(32, axis=-1), calibrator="minmax")
    recipe = lowbit.Recipe(default_weight=w4, default_input=lowbit.preset("int8").default_input)
    recipe = recipe.with_rules(lowbit.LayerRule("re:.*", w4, None))  # weight-only: inputs stay float
    errors = {}
    for passes in ((), (rounding,)):
        q = pipeline.quantize(model, x, recipe.with_passes(*passes), x[:1], show_progress=False)
        assert tuple(q.get_submodule("0").weight_quantizer.scale.shape) == (128, 2)  # one scale per 32 inputs
        with torch.no_grad():
            errors[passes] = float((q(x) - model(x)).pow(2).mean())
    assert errors[(rounding,)] < 0.7 * errors[()]
