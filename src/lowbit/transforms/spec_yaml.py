"""QuantSpec ⇄ plain dict (the YAML form), with clear errors naming the offending key.

YAML form of a spec (every key optional, missing keys inherit from a base spec)::

    {bits: 8, signed: true, symmetric: false, narrow_range: false,
     granularity: per_channel, axis: 0, group_size: 128, calibrator: entropy}
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lowbit.core import PerChannel, PerGroup, PerTensor, QuantSpec

SPEC_KEYS = ("bits", "signed", "symmetric", "narrow_range", "granularity", "axis", "group_size", "calibrator")
GRANULARITIES = ("per_tensor", "per_channel", "per_group")


def _expect(where: str, key: str, value: Any, kind: type | tuple) -> Any:
    if isinstance(value, bool) and kind is int:
        raise ValueError(f"{where}.{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _granularity(where: str, raw: dict, base) -> Any:
    kind = raw.get("granularity", base.kind)
    if kind not in GRANULARITIES:
        raise ValueError(f"{where}.granularity: expected one of {GRANULARITIES}, got {kind!r}")
    if kind == "per_tensor":
        for key in ("axis", "group_size"):
            if key in raw:
                raise ValueError(f"{where}.{key}: not allowed with granularity per_tensor")
        return PerTensor()
    axis = _expect(where, "axis", raw.get("axis", getattr(base, "axis", 0 if kind == "per_channel" else -1)), int)
    if kind == "per_channel":
        if "group_size" in raw:
            raise ValueError(f"{where}.group_size: only allowed with granularity per_group")
        return PerChannel(axis)
    size = _expect(where, "group_size", raw.get("group_size", getattr(base, "size", 128)), int)
    return PerGroup(size=size, axis=axis)


def spec_from_dict(raw: Any, base: QuantSpec, where: str) -> QuantSpec:
    """Build a spec from its YAML dict, inheriting missing keys from ``base``.

    Raises:
        ValueError: naming ``where`` and the key for unknown keys, wrong types or bad values.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of spec keys, got {raw!r}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(SPEC_KEYS)}")
    fields = {}
    for key, kind in (("bits", int), ("signed", bool), ("symmetric", bool), ("narrow_range", bool), ("calibrator", str)):
        if key in raw:
            fields[key] = _expect(where, key, raw[key], kind)
    fields["granularity"] = _granularity(where, raw, base.granularity)
    try:
        return replace(base, **fields)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def spec_to_dict(spec: QuantSpec) -> dict:
    """The full YAML dict of ``spec``."""
    out: dict[str, Any] = {
        "bits": spec.bits,
        "signed": spec.signed,
        "symmetric": spec.symmetric,
        "narrow_range": spec.narrow_range,
        "granularity": spec.granularity.kind,
        "calibrator": spec.calibrator,
    }
    g = spec.granularity
    if isinstance(g, (PerChannel, PerGroup)):
        out["axis"] = g.axis
    if isinstance(g, PerGroup):
        out["group_size"] = g.size
    return out
