"""``Recipe``: what the user, the search and YAML files all speak.

A recipe holds the default weight and input specs, ordered per-layer rules (first match wins), the target
runtime and the post-training passes. Layer rules match a layer by

* ``type:Conv2d`` — the module's class name (or ``type:add`` / ``type:cat`` / ``type:matmul`` for
  functional ops),
* ``re:<regex>`` — a regular expression on the qualified layer name (``re.fullmatch``),
* anything else — a shell glob on the qualified layer name (``features.*.conv``).

A rule whose ``weight`` and ``input`` are both ``None`` keeps the layer in float.
"""

from __future__ import annotations

import fnmatch
import platform
import re
import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.transforms.pass_registry import PASS_REGISTRY, check_passes
from lowbit.transforms.spec_yaml import spec_from_dict, spec_to_dict

TARGETS = ("onnxruntime", "tensorrt", "litert")
PASSES = tuple(PASS_REGISTRY)  # in the order they run (transforms.pass_registry)


def pattern_matches(pattern: str, name: str, type_name: str) -> bool:
    """Whether a rule pattern names a layer: ``type:<Class>``, ``re:<regex>`` (full match) or a glob.

    >>> pattern_matches("type:Conv2d", "features.0", "Conv2d"), pattern_matches("re:fc[0-9]", "fc2", "Linear")
    (True, True)
    >>> pattern_matches("features.*", "classifier", "Linear")
    False
    """
    if pattern.startswith("type:"):
        return pattern[5:] == type_name
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class LayerRule:
    """Per-layer override; ``weight`` / ``input`` None means that tensor stays float."""

    pattern: str
    weight: QuantSpec | None
    input: QuantSpec | None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"rule pattern must be a non-empty string, got {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as exc:
                raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {exc}") from None

    @property
    def keeps_float(self) -> bool:
        """True when this rule keeps the layer entirely in float."""
        return self.weight is None and self.input is None


@dataclass(frozen=True)
class Recipe:
    """Defaults, ordered rules, target runtime and post-training passes."""

    default_weight: QuantSpec
    default_input: QuantSpec
    rules: tuple[LayerRule, ...] = ()
    target: str = "onnxruntime"
    passes: tuple[str, ...] = ()
    version: int = 1
    # 8-bit weights that become 7-bit on CPUs without an int8 dot product when a job runs (for_machine): set
    # by the int8 presets and by YAML recipes that do not give weight bits; never written to YAML.
    machine_weight_bits: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"recipe target must be one of {TARGETS}, got {_brief(self.target)}")
        check_passes(self.passes, lambda value: _brief(value))  # _brief is defined further down
        if not isinstance(self.passes, tuple):
            object.__setattr__(self, "passes", tuple(self.passes))
        if self.version != 1:
            raise ValueError(f"recipe version {_brief(self.version)} is not supported (only 1)")
        if not isinstance(self.rules, tuple):
            object.__setattr__(self, "rules", tuple(self.rules))
        if self.target == "tensorrt":
            self._check_tensorrt()
        if self.target == "litert":
            self._check_litert()

    def _check_tensorrt(self) -> None:
        specs = [("default weight", self.default_weight), ("default input", self.default_input)]
        specs += [(f"rule {r.pattern!r} {k}", s) for r in self.rules for k, s in (("weight", r.weight), ("input", r.input))]
        for where, spec in specs:
            if spec is not None and (not spec.symmetric or not spec.signed):
                raise ValueError(f"target tensorrt needs signed symmetric quantization; {where} is not")

    def _check_litert(self) -> None:
        specs = [("default", self.default_weight, self.default_input)]
        specs += [(f"rule {r.pattern!r}", r.weight, r.input) for r in self.rules]
        for where, weight, act in specs:
            if weight is not None and (not weight.signed or not weight.symmetric or weight.bits > 8):
                raise ValueError(f"target litert needs signed symmetric weights of at most 8 bits (zero-point 0); "
                                 f"{where} weight is not")
            if act is not None and (not act.signed or act.bits != 8 or not isinstance(act.granularity, PerTensor)):
                raise ValueError(f"target litert needs int8 per-tensor activations; {where} input is not")

    def resolve(self, name: str, type_name: str) -> tuple[QuantSpec | None, QuantSpec | None]:
        """``(weight_spec, input_spec)`` for one layer: the first matching rule, else the defaults."""
        for rule in self.rules:
            if pattern_matches(rule.pattern, name, type_name):
                return rule.weight, rule.input
        return self.default_weight, self.default_input

    def with_calibrator(self, calibrator: str) -> Recipe:
        """The same recipe with ``calibrator`` for every activation (input) spec."""
        rules = tuple(
            replace(r, input=None if r.input is None else replace(r.input, calibrator=calibrator)) for r in self.rules
        )
        return replace(self, default_input=replace(self.default_input, calibrator=calibrator), rules=rules)

    def with_rules(self, *rules: LayerRule) -> Recipe:
        """The same recipe with ``rules`` placed before the existing ones (they win)."""
        return replace(self, rules=tuple(rules) + self.rules)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Recipe:
        """Load a recipe from a YAML file (or a preset name); see :func:`load_recipe`."""
        return load_recipe(source)

    def to_yaml(self) -> str:
        """This recipe as YAML text (round-trips through ``from_yaml``)."""
        return dump_recipe(self)

    def with_passes(self, *passes: str) -> Recipe:
        """The same recipe running ``passes`` (see ``lowbit.transforms.pass_registry`` for their fixed order)."""
        return replace(self, passes=tuple(passes))

    def keep_float(self, *patterns: str) -> Recipe:
        """The same recipe with the matching layers kept in float."""
        return self.with_rules(*(LayerRule(p, None, None) for p in patterns))

    def for_machine(self) -> Recipe:
        """This recipe as it runs on this machine: with ``machine_weight_bits``, 8-bit weight specs (defaults and
        rules) take :func:`machine_weight_bits` (7 on x86 CPUs without VNNI); the result is final (flag off).

        Every job, ``prepare_`` and ``quantize_dynamic_`` call it, so the ``recipe.yaml`` a job writes holds the
        bits that ran.
        """
        if not self.machine_weight_bits:
            return self
        bits = machine_weight_bits()

        def fit(spec: QuantSpec | None) -> QuantSpec | None:
            return replace(spec, bits=bits) if spec is not None and spec.bits == 8 else spec

        rules = tuple(replace(r, weight=fit(r.weight)) for r in self.rules)
        return replace(self, default_weight=fit(self.default_weight), rules=rules, machine_weight_bits=False)


def cpu_has_int8_dot_product() -> bool:
    """True when this CPU multiplies u8 x s8 without 16-bit saturation (VNNI / AMX on x86, any Arm CPU).

    On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of products in int16 with
    saturation (``vpmaddubsw``): two 8-bit weights times activations near 255 overflow, and the engine's
    output silently departs from the model. 7-bit weights (``[-64, 63]``, ONNX Runtime's ``reduce_range``)
    cannot overflow.
    """
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"))


@functools.cache
def machine_weight_bits() -> int:
    """Weight bits the ``int8`` presets use on this machine for ONNX Runtime: 8, or 7 on x86 CPUs without VNNI
    (ONNX Runtime's ``reduce_range``; see :func:`cpu_has_int8_dot_product`). Read when a job runs."""
    return 8 if cpu_has_int8_dot_product() else 7


INT8_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax")
UINT8_ACT = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="percentile")

# Pure values, the same on every machine. The int8 presets for ONNX Runtime keep weights in int8 containers
# but use 7 bits on CPUs without VNNI: machine_weight_bits marks that, resolved by Recipe.for_machine().
PRESETS: dict[str, Recipe] = {
    "int8": Recipe(default_weight=INT8_WEIGHT, default_input=UINT8_ACT, machine_weight_bits=True),
    "int8-per-tensor": Recipe(
        default_weight=replace(INT8_WEIGHT, granularity=PerTensor()),
        default_input=replace(UINT8_ACT, calibrator="minmax"),
        machine_weight_bits=True,
    ),
    "tensorrt-int8": Recipe(
        default_weight=replace(INT8_WEIGHT, narrow_range=True),
        default_input=QuantSpec(bits=8, signed=True, symmetric=True, calibrator="entropy"),
        target="tensorrt",
    ),
    # LiteRT (TFLite) int8: weights int8 symmetric per-channel in [-127, 127] (zero-point 0, what the interpreter
    # accepts), activations int8 asymmetric (TFLITE_BUILTINS_INT8).
    "litert-int8": Recipe(
        default_weight=replace(INT8_WEIGHT, narrow_range=True),
        default_input=replace(UINT8_ACT, signed=True),
        target="litert",
    ),
}


def preset(name: str) -> Recipe:
    """A built-in recipe by name (``int8``, ``int8-per-tensor``, ``tensorrt-int8``, ``litert-int8``).

    >>> r = preset("int8")
    >>> r.target, r.default_weight.granularity, r.default_input.calibrator
    ('onnxruntime', PerChannel(axis=0), 'percentile')
    >>> r.default_weight.bits, r.machine_weight_bits  # the same on every machine ...
    (8, True)
    >>> r.for_machine().default_weight.bits == machine_weight_bits()  # ... 7-bit on x86 CPUs without VNNI
    True
    >>> t = preset("tensorrt-int8")
    >>> t.target, t.default_weight.narrow_range, t.default_input.signed, t.default_input.calibrator
    ('tensorrt', True, True, 'entropy')
    >>> r.keep_float("fc").resolve("fc", "Linear")  # a rule keeping the layer float: no weight, no input spec
    (None, None)
    >>> preset("int4")
    Traceback (most recent call last):
    ...
    ValueError: unknown recipe preset 'int4'; presets: int8, int8-per-tensor, tensorrt-int8, litert-int8
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown recipe preset {name!r}; presets: {', '.join(PRESETS)}") from None


RECIPE_KEYS = ("version", "target", "passes", "weight", "input", "rules")
MAX_RECIPE_BYTES = 1 << 20
_BRIEF = 80


def _brief(value: Any) -> str:
    """``repr(value)`` cut to a bounded prefix, so an error message never embeds a huge user value."""
    text = repr(value)
    return text if len(text) <= _BRIEF else f"{text[:_BRIEF]}... ({len(text)} characters)"


class _NoAliasSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): no billion-laughs expansion of a recipe."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in recipes", mark)
        return super().compose_node(parent, index)
RULE_KEYS = ("pattern", "weight", "input", "float")


def _rule_spec(raw: Any, base: QuantSpec, where: str) -> QuantSpec | None:
    if raw == "float" or raw is None:
        return None
    return spec_from_dict(raw, base, where)


def _rule_from_dict(raw: Any, recipe_weight: QuantSpec, recipe_input: QuantSpec, where: str) -> LayerRule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with 'pattern', got {_brief(raw)}")
    unknown = sorted(set(raw) - set(RULE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {_brief(unknown[0])}; allowed keys: {', '.join(RULE_KEYS)}")
    if "pattern" not in raw:
        raise ValueError(f"{where}: missing key 'pattern'")
    if raw.get("float", False) is True:
        if "weight" in raw or "input" in raw:
            raise ValueError(f"{where}: 'float: true' cannot be combined with 'weight' or 'input'")
        weight = inp = None
    else:
        weight = _rule_spec(raw.get("weight", {}), recipe_weight, f"{where}.weight")
        inp = _rule_spec(raw.get("input", {}), recipe_input, f"{where}.input")
    try:
        return LayerRule(str(raw["pattern"]), weight, inp)
    except ValueError as exc:  # bad regex / empty pattern: name the file and rule like every other error
        raise ValueError(f"{where}.pattern: {exc}") from None


def recipe_from_dict(raw: Any, where: str = "recipe") -> Recipe:
    """Build a recipe from its YAML dict; missing top-level keys come from the ``int8`` preset, as it runs on this
    machine (``Recipe.for_machine``)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {_brief(unknown[0])}; allowed keys: {', '.join(RECIPE_KEYS)}")
    base = PRESETS["int8"].for_machine()  # a file is read when its job runs: missing bits are this machine's
    weight = spec_from_dict(raw.get("weight", {}), base.default_weight, f"{where}.weight")
    inp = spec_from_dict(raw.get("input", {}), base.default_input, f"{where}.input")
    rules_raw = raw.get("rules", []) or []
    if not isinstance(rules_raw, list):
        raise ValueError(f"{where}.rules: expected a list, got {_brief(rules_raw)}")
    rules = tuple(_rule_from_dict(r, weight, inp, f"{where}.rules[{i}]") for i, r in enumerate(rules_raw))
    passes = raw.get("passes", []) or []
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise ValueError(f"{where}.passes: expected a list of pass names, got {_brief(passes)}")
    try:
        return Recipe(weight, inp, rules, target=raw.get("target", "onnxruntime"), passes=tuple(passes),
                      version=raw.get("version", 1))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """The full YAML dict of ``recipe`` (round-trips through ``recipe_from_dict``)."""
    rules = []
    for r in recipe.rules:
        if r.keeps_float:
            rules.append({"pattern": r.pattern, "float": True})
            continue
        rules.append({
            "pattern": r.pattern,
            "weight": "float" if r.weight is None else spec_to_dict(r.weight),
            "input": "float" if r.input is None else spec_to_dict(r.input),
        })
    return {
        "version": recipe.version,
        "target": recipe.target,
        "passes": list(recipe.passes),
        "weight": spec_to_dict(recipe.default_weight),
        "input": spec_to_dict(recipe.default_input),
        "rules": rules,
    }


def load_recipe(source: str | Path) -> Recipe:
    """A preset name or a YAML file path → Recipe (YAML read with a safe loader that refuses aliases; errors name
    the file and quote at most a bounded prefix of any value)."""
    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"recipe {str(source)!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe file {path}: {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        raw = yaml.load(path.read_text(), Loader=_NoAliasSafeLoader)  # noqa: S506 — a safe loader, aliases refused
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe file {path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(raw, where=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of ``recipe``."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
