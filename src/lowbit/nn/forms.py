"""The two switches other packages may pull on nn's modules: engine-kernel emulation and the ONNX export form.

Quantized layers and adds hold references to the quantizers the graph pass linked them with (the output
quantizer the engine fuses into QLinearConv / QLinearMatMul, QLinearAdd's three quantizers), kept outside the
module tree on purpose. :func:`engine_emulation` turns the bit-exact integer emulation those links enable off
(plain fake-quant float) or back on; :func:`export_form` switches quantizers and layers to the form that traces
into ONNX Q/DQ. Nothing outside ``lowbit.nn`` reads or writes these attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

from lowbit.nn.functional import QuantAdd
from lowbit.nn.modules import QuantLayerMixin
from lowbit.nn.quantizer import TensorQuantizer

_STASH = "_engine_link_off"  # where a switched-off link waits to be switched on again
_MISSING = object()


def _link_key(m: nn.Module) -> str | None:
    if isinstance(m, QuantLayerMixin):
        return "_engine_output"
    if isinstance(m, QuantAdd):
        return "_quantizers"
    return None


def set_engine_emulation(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the engine-kernel emulation of every quantized layer and add in ``model`` off (plain fake-quant
    float: the pre-activation output of a layer, ``a + b`` of an add) or back on, until switched again."""
    for m in model.modules():
        key = _link_key(m)
        if key is None:
            continue
        if enabled:
            if _STASH in m.__dict__:
                m.__dict__[key] = m.__dict__.pop(_STASH)
        elif _STASH not in m.__dict__:
            m.__dict__[_STASH] = m.__dict__.get(key)
            m.__dict__[key] = None
    return model


@contextlib.contextmanager
def engine_emulation(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """:func:`set_engine_emulation` for the duration of the block; every link is as before on exit.

    Off, every layer and add runs as plain fake-quant float instead of the engine's exact integer kernels
    (which need float64 convolutions when the accumulator may pass 2^24, several times slower); the two differ
    only where a value lies within float error of a rounding tie.
    """
    saved = []
    for m in model.modules():
        key = _link_key(m)
        if key is not None:
            saved.append((m, key, m.__dict__.get(key), m.__dict__.get(_STASH, _MISSING)))
    set_engine_emulation(model, enabled)
    try:
        yield model
    finally:
        for m, key, link, stash in saved:
            m.__dict__[key] = link
            if stash is _MISSING:
                m.__dict__.pop(_STASH, None)
            else:
                m.__dict__[_STASH] = stash


@contextlib.contextmanager
def export_form(model: nn.Module) -> Iterator[nn.Module]:
    """Switch quantizers and quantized layers to their ONNX form (integer initializers behind Q/DQ, computed
    once per export) for the duration of the block."""
    mods = [m for m in model.modules() if isinstance(m, (TensorQuantizer, QuantLayerMixin))]
    for m in mods:
        m.export_mode = True
        active = m.is_active if isinstance(m, TensorQuantizer) else m.weight_quantizer.is_active
        m.__dict__["_export_tensors"] = m.export_tensors() if active else None
    try:
        yield model
    finally:
        for m in mods:
            m.export_mode = False
            m.__dict__.pop("_export_tensors", None)


@contextlib.contextmanager
def instance_overrides(overrides: Iterable[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Within the block each ``(module, name, value)`` is an instance attribute of ``module`` (a replacement
    ``forward``, a predicate…), shadowing the class's; afterwards every module is as before. Exporters other than
    ONNX (LiteRT's PT2E form) trace through such overrides."""
    undo: list = []
    try:
        for obj, name, value in overrides:
            undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
            obj.__dict__[name] = value
        yield
    finally:
        for obj, name, old in reversed(undo):
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
