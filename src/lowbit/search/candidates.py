"""Quantize many candidate recipes of one model cheaply, with exactly the result of ``lowbit.quantize``.

Calibration runs every quantizer in float, so an activation quantizer's statistics depend only on the
tensor it watches and its spec — not on which other layers are quantized. :class:`CandidateBuilder`
therefore calibrates a tensor once per ``(producer, spec, bounds)`` and reuses the frozen scale and
zero-point for every recipe that quantizes that tensor the same way:

    prepare_(copy of model, recipe) → weight quantizers observe their weights → activation quantizers take
    the cached qparams → (calibration pass for the tensors not seen yet) → convert_

Calibration batches are the same as ``calibrate``'s (``batch_size`` 32), so a built candidate equals
``lowbit.quantize(model, calib_data, recipe)`` bit for bit. Recipes with post-training passes change the
weights around calibration; they are quantized with ``lowbit.quantize`` each time (no reuse).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn

from lowbit.nn import QuantLayerMixin, QuantState, TensorQuantizer
from lowbit.nn.functional import QuantAdd
from lowbit.data import Data, iter_batches, run_batch
from lowbit.ptq.passes import quantize
from lowbit.transforms.prepare import convert_, prepare_, start_calibration_
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

CALIB_BATCH = 32  # ``calibrate``'s default batch size: the same batches give the same statistics


def layer_pattern(name: str) -> str:
    """A recipe rule pattern that matches exactly the layer ``name`` (a glob, or ``re:`` when needed)."""
    if name.startswith(("type:", "re:")) or any(c in name for c in "*?[]"):
        return "re:" + re.escape(name)
    return name  # a glob without wildcards matches only itself


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, str]]:
    """``(name, kind)`` of every site ``prepare_`` quantized (execution order when traced)."""
    info = getattr(qmodel, "lowbit_info", None)
    if info is None:
        raise ValueError("model has no lowbit_info: pass a model returned by lowbit.quantize / prepare_")
    return list(info.layer_kinds.items())


def _source_key(gm: fx.GraphModule, node) -> str:
    """Name of the tensor a quantizer watches; an add replaced by the engine emulation keeps the add's name."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, QuantAdd):
            return f"fn:{mod.layer_name}"
    return f"node:{getattr(node, 'name', node)}"


def activation_quantizers(model: nn.Module) -> Iterator[tuple[tuple, TensorQuantizer]]:
    """``(key, quantizer)`` for every activation quantizer with a spec; the key names the tensor and spec."""
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op != "call_module" or not str(node.target).startswith("lowbit_act."):
                continue
            q = model.get_submodule(str(node.target))
            if isinstance(q, TensorQuantizer) and q.spec is not None:
                yield (_source_key(model, node.args[0]), q.spec, q.bounds), q
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayerMixin) and mod.input_quantizer.spec is not None:
            q = mod.input_quantizer
            yield (f"input:{name}", q.spec, q.bounds), q


class CandidateBuilder:
    """Builds converted models for recipes of one float model (module doc).

    Args:
        model: the FLOAT model (left untouched).
        calib_data: calibration data as for ``lowbit.calibrate`` (a Tensor, batches, or ``forward_loop``).
        example_input: passed to ``prepare_``.
    """

    def __init__(self, model: nn.Module, calib_data: Data, example_input: torch.Tensor | None = None) -> None:
        self.model = model
        self.calib_data = calib_data
        self.example_input = example_input
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calibration_passes = 0
        self.batches = 0  # forward calls of one calibration pass (each one observes every weight again)

    def build(self, recipe: Recipe) -> nn.Module:
        """The converted model for ``recipe`` (equal to ``lowbit.quantize(model, calib_data, recipe)``)."""
        if recipe.passes:
            return quantize(self.model, self.calib_data, recipe, self.example_input, show_progress=False)
        prepared = prepare_(copy.deepcopy(self.model).eval(), recipe, self.example_input)
        start_calibration_(prepared)
        missing = []
        for key, q in activation_quantizers(prepared):
            hit = self.cache.get(key)
            if hit is None:
                missing.append((key, q))
            else:
                q.set_qparams(*hit)
        if missing:
            self._calibrate(prepared, missing)
        else:
            self._observe_weights(prepared)
        return convert_(prepared)

    def _observe_weights(self, prepared: nn.Module) -> None:
        """Weights are observed once more in every calibration forward; repeat that (histogram calibrators
        count each observation)."""
        for layer in prepared.modules():
            if isinstance(layer, QuantLayerMixin) and layer.weight_quantizer.state is QuantState.CALIBRATING:
                for _ in range(self.batches):
                    layer.weight_quantizer.observe(layer.weight)

    def _calibrate(self, prepared: nn.Module, missing: list[tuple[tuple, TensorQuantizer]]) -> None:
        """One float pass over the calibration data for the quantizers the cache does not hold."""
        frozen = [q for q in prepared.modules() if isinstance(q, TensorQuantizer) and q.state is QuantState.FROZEN]
        saved = [q.enabled for q in frozen]
        for q in frozen:
            q.enabled = False  # a frozen quantizer must not quantize during calibration
        calls = []
        hook = prepared.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            with torch.no_grad():
                data = self.calib_data
                if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
                    data(prepared)
                else:
                    for batch in iter_batches(data, CALIB_BATCH):
                        run_batch(prepared, batch)
        finally:
            hook.remove()
            for q, was in zip(frozen, saved):
                q.enabled = was
        if not calls:
            raise ValueError("calibration data is empty: no batch was seen")
        self.batches = len(calls)
        for key, q in missing:
            q.freeze()
            self.cache[key] = (q.scale.clone(), q.zero_point.clone())
        self.calibration_passes += 1
        log.debug("calibrated %d new activation quantizers", len(missing))
