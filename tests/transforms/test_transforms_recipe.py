"""Recipe: presets, YAML round trip, rule matching and error messages that name the culprit."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import yaml

import lowbit
from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.transforms.recipe import PRESETS, LayerRule, Recipe, load_recipe, preset, recipe_from_dict
from lowbit.transforms.spec_yaml import spec_from_dict, spec_to_dict


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_yaml(tmp_path, name):
    recipe = preset(name)
    assert load_recipe(name) is recipe
    text = recipe.to_yaml()
    back = Recipe.from_yaml(_write(tmp_path, text))
    assert back == recipe
    assert back.to_yaml() == text
    assert yaml.safe_load(text)["target"] == recipe.target


def test_recipe_with_rules_round_trips(tmp_path):
    recipe = preset("int8").with_rules(
        LayerRule("re:features\\.[0-3]\\..*", QuantSpec(bits=4, granularity=PerGroup(32, 1)), None),
        LayerRule("type:Linear", QuantSpec(granularity=PerChannel(0)), QuantSpec(signed=False, symmetric=False)),
    ).keep_float("classifier.*")
    back = load_recipe(_write(tmp_path, recipe.to_yaml()))
    assert back == recipe
    assert back.rules[0].keeps_float and back.rules[0].pattern == "classifier.*"
    assert back.rules[1].input is None and back.rules[1].weight.granularity == PerGroup(32, 1)


def test_spec_dict_round_trip_every_granularity():
    for spec in (QuantSpec(), QuantSpec(granularity=PerChannel(1), narrow_range=True),
                 QuantSpec(bits=4, signed=False, symmetric=False, granularity=PerGroup(64, -1), calibrator="mse")):
        assert spec_from_dict(spec_to_dict(spec), QuantSpec(bits=3), "s") == spec


def test_missing_keys_inherit_from_int8_preset(tmp_path):
    recipe = load_recipe(_write(tmp_path, "input: {calibrator: entropy}\n"))
    assert recipe.default_weight == PRESETS["int8"].default_weight
    assert recipe.default_input == replace(PRESETS["int8"].default_input, calibrator="entropy")


def test_rules_resolve_first_match_wins():
    w4 = QuantSpec(bits=4)
    recipe = Recipe(QuantSpec(), QuantSpec(), rules=(
        LayerRule("type:add", None, None),
        LayerRule("re:block\\d+\\.conv", w4, QuantSpec()),
        LayerRule("block*", QuantSpec(bits=6), None),
    ))
    assert recipe.resolve("add_1", "add") == (None, None)
    assert recipe.resolve("block12.conv", "Conv2d") == (w4, QuantSpec())
    assert recipe.resolve("block12.conv2", "Conv2d") == (QuantSpec(bits=6), None)  # re: is a full match
    assert recipe.resolve("stem", "Conv2d") == (QuantSpec(), QuantSpec())
    assert recipe.resolve("xblock1", "Conv2d") == (QuantSpec(), QuantSpec())


def test_with_calibrator_changes_only_activation_specs():
    recipe = preset("int8").with_rules(
        LayerRule("a", QuantSpec(calibrator="minmax"), QuantSpec(calibrator="minmax")),
        LayerRule("b", QuantSpec(), None),
    )
    out = recipe.with_calibrator("mse")
    assert out.default_input.calibrator == "mse" and out.default_weight == recipe.default_weight
    assert out.rules[0].input.calibrator == "mse" and out.rules[0].weight.calibrator == "minmax"
    assert out.rules[1].input is None
    assert recipe.default_input.calibrator == "percentile"  # original untouched (frozen)


def test_keep_float_puts_rules_first():
    recipe = preset("int8").with_rules(LayerRule("fc", QuantSpec(bits=4), None)).keep_float("fc", "head")
    assert [r.pattern for r in recipe.rules] == ["fc", "head", "fc"]
    assert recipe.resolve("fc", "Linear") == (None, None)
    assert recipe.rules[0].keeps_float


def test_tensorrt_rejects_asymmetric_or_unsigned():
    with pytest.raises(ValueError, match="target tensorrt needs signed symmetric quantization; default input is not"):
        Recipe(QuantSpec(), QuantSpec(signed=False, symmetric=False), target="tensorrt")
    with pytest.raises(ValueError, match="rule 'fc' weight"):
        Recipe(QuantSpec(), QuantSpec(), rules=(LayerRule("fc", QuantSpec(symmetric=False), None),), target="tensorrt")
    Recipe(QuantSpec(), QuantSpec(), rules=(LayerRule("fc", None, None),), target="tensorrt")  # float is fine


def test_tensorrt_yaml_inheriting_uint8_input_is_rejected(tmp_path):
    path = _write(tmp_path, "target: tensorrt\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*tensorrt.*default input"):
        load_recipe(path)


@pytest.mark.parametrize(("text", "culprit"), [
    ("wieght: {bits: 8}\n", "unknown key 'wieght'"),
    ("weight: {bitz: 8}\n", "recipe.yaml.weight: unknown key 'bitz'"),
    ("weight: {bits: eight}\n", "recipe.yaml.weight.bits: expected int, got 'eight'"),
    ("weight: {bits: true}\n", "weight.bits: expected an integer, got True"),
    ("input: {signed: 1}\n", "input.signed: expected bool, got 1"),
    ("weight: {bits: 17}\n", "weight: bits must be an integer in [2, 16], got 17"),
    ("weight: {granularity: per_row}\n", "weight.granularity: expected one of"),
    ("input: {granularity: per_tensor, axis: 1}\n", "input.axis: not allowed with granularity per_tensor"),
    ("weight: {granularity: per_channel, group_size: 8}\n", "weight.group_size: only allowed with granularity per_group"),
    ("rules: [{pattern: 're:conv[', float: true}]\n", "rules[0].pattern: rule pattern 're:conv[' is not a valid regex"),
    ("rules: [{pattern: '', float: true}]\n", "rules[0].pattern: rule pattern must be a non-empty string"),
    ("rules: [{pattern: fc, flaot: true}]\n", "rules[0]: unknown key 'flaot'"),
    ("rules: [{weight: {bits: 4}}]\n", "rules[0]: missing key 'pattern'"),
    ("rules: [{pattern: fc, float: true, weight: {bits: 4}}]\n", "'float: true' cannot be combined"),
    ("rules: [{pattern: fc, weight: {granularity: per_grop}}]\n", "rules[0].weight.granularity"),
    ("rules: {pattern: fc}\n", "rules: expected a list"),
    ("target: tpu\n", "recipe target must be one of"),
    ("passes: [cle, magic]\n", "unknown pass 'magic'"),
    ("passes: [adaround, gptq]\n", "name only one"),
    ("passes: [cle, cle]\n", "named twice"),
    ("version: 2\n", "recipe version 2 is not supported"),
    ("- just a list\n", "expected a mapping, got list"),
])
def test_yaml_errors_name_the_culprit(tmp_path, text, culprit):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    assert culprit in str(err.value)
    assert str(path) in str(err.value)


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "weight: {bits: 8\ninput: [\n", name="broken.yaml")
    with pytest.raises(ValueError, match=f"recipe file {re.escape(str(path))}: malformed YAML"):
        load_recipe(path)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError, match="unknown recipe preset 'int9'; presets: int8, int8-per-tensor, tensorrt-int8"):
        preset("int9")
    with pytest.raises(ValueError, match="recipe 'int9' is neither a preset"):
        load_recipe("int9")


def test_recipe_from_dict_default_where():
    with pytest.raises(ValueError, match="^recipe: unknown key 'x'"):
        recipe_from_dict({"x": 1})
    assert recipe_from_dict({}) == Recipe(PRESETS["int8"].default_weight, PRESETS["int8"].default_input)


def test_spec_errors_from_constructors():
    with pytest.raises(ValueError, match="rule pattern must be a non-empty string"):
        LayerRule("", None, None)
    assert PerTensor() == spec_from_dict({"granularity": "per_tensor"}, QuantSpec(granularity=PerChannel(0)), "s").granularity


def test_presets_are_pure_and_weight_bits_follow_the_machine_when_a_job_runs(monkeypatch, tmp_path):
    """On a CPU without VNNI (simulated) the int8 presets keep 8 bits as values; prepare_ / the jobs use 7."""
    import lowbit.transforms.recipe as recipe_mod
    from lowbit.nn import QuantLayerMixin

    monkeypatch.setattr(recipe_mod, "machine_weight_bits", lambda: 7)
    r = lowbit.preset("int8").with_rules(lowbit.LayerRule("fc", lowbit.preset("int8").default_weight, None))
    assert r.default_weight.bits == 8 and r.machine_weight_bits
    run = r.for_machine()
    assert run.default_weight.bits == 7 and run.rules[0].weight.bits == 7 and not run.machine_weight_bits
    assert run.for_machine() is run and "machine_weight_bits" not in run.to_yaml()
    assert lowbit.preset("tensorrt-int8").for_machine().default_weight.bits == 8  # not a machine-bits preset
    plain = tmp_path / "plain.yaml"
    plain.write_text("version: 1\ninput: {calibrator: minmax}\n")
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("version: 1\nweight: {bits: 8}\n")
    assert lowbit.load_recipe(plain).default_weight.bits == 7  # a file is read when its job runs
    assert lowbit.load_recipe(explicit).default_weight.bits == 8
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    q = lowbit.prepare_(model, lowbit.preset("int8"), torch.randn(1, 4))
    assert [m.weight_quantizer.spec.bits for m in q.modules() if isinstance(m, QuantLayerMixin)] == [7]
    assert q.lowbit_info.recipe.default_weight.bits == 7
