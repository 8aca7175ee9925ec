"""Empirical bias correction: after it, every layer's mean output equals the float model's."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

import lowbit
from lowbit.ptq import bias_correction
from lowbit.ptq.capture import ChannelMean, ForwardLoop, engine_unlinked, layer_order, run_until


def _w3(recipe):
    return replace(recipe, default_weight=replace(recipe.default_weight, bits=3))


def _layer_mean_errors(q, loop, ref):
    layers = layer_order(q, loop)
    errs = {}
    for name, layer in layers:
        cm = ChannelMean(1 if layer.weight.ndim > 2 else -1)
        with engine_unlinked(layer):
            run_until(q, loop, layer, on_output=cm.update)
        errs[name] = float((ref[name] - cm.mean).abs().max())
    return errs


def test_mean_output_error_is_removed_layer_by_layer(digits):
    model, calib, _, _ = digits
    recipe = _w3(lowbit.preset("int8"))
    q = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
    loop = ForwardLoop(calib)
    # the float reference is taken before the pass: the pass moves the biases the float mode would use too
    ref = bias_correction.float_output_means(q, loop, layer_order(q, loop))
    before = _layer_mean_errors(q, loop, ref)
    bias_correction.apply(q, loop)
    after = _layer_mean_errors(q, loop, ref)
    for name in before:
        # what is left is the int32 bias grid (s_in · s_w) and the shift's effect on later rounding
        step = float(q.get_submodule(name).bias_qparams()[0].max())
        assert after[name] <= max(0.05 * before[name], 2 * step), (name, before[name], after[name])


def test_bias_correction_improves_low_bit_accuracy(digits):
    model, calib, x, y = digits
    recipe = _w3(lowbit.preset("int8"))
    accs = {}
    for passes in ((), ("bias_correction",)):
        q = lowbit.quantize(copy.deepcopy(model), calib, recipe.with_passes(*passes), calib[:1], show_progress=False)
        with torch.no_grad():
            accs[passes] = float((q(x).argmax(1) == y).float().mean())
    assert accs[("bias_correction",)] > accs[()]
