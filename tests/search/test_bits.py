"""Bit allocation on digits-cnn: optimal for its loss table (brute force), sizes and MACs recomputed by hand,
the estimate and the measured metric reproduced independently, Pareto flags, bad budgets."""

from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.analysis.metrics import accuracy, kl_softmax
from lowbit.search import allocate_bits, front
from lowbit.search.bits import measure_layers, option_specs
from lowbit.search.scoring import float_copy
from lowbit.transforms.recipe import LayerRule, machine_weight_bits

LAYERS = ["conv1", "res_conv1", "res_conv2", "down_conv", "fc"]
# MACs per sample by hand: output elements x weights per output element (8x8 digits, stride-2 down_conv).
MACS = {"conv1": 16 * 64 * 9, "res_conv1": 16 * 64 * 144, "res_conv2": 16 * 64 * 144, "down_conv": 32 * 16 * 144,
        "fc": 10 * 32}


@pytest.fixture(scope="module")
def alloc(digits):
    model, calib, x, y = digits
    metric = lambda ref, out: accuracy(out, y)  # noqa: E731
    return allocate_bits(model, calib, x, lowbit.preset("int8"), avg_bits=4.0, metric_fn=metric,
                         example_input=calib[:1], pareto_points=4)


def _params(model):
    return {n: getattr(model, n).weight.numel() for n in LAYERS}


def test_allocation_is_optimal_for_its_loss_table(alloc, digits):
    """Brute force over all 6^5 allocations with the reported losses and costs computed here."""
    params = _params(digits[0])
    opts = [(w, a) for w in (2, 4, 8) for a in (8, 16)]
    best = None
    for combo in itertools.product(opts, repeat=len(LAYERS)):
        bits = sum(params[n] * w for n, (w, _) in zip(LAYERS, combo))
        bops = sum(MACS[n] * w * a for n, (w, a) in zip(LAYERS, combo))
        if bits <= 4.0 * sum(params.values()) and bops <= 64 * sum(MACS.values()):
            loss = sum(alloc.losses[n][f"w{w}a{a}"] for n, (w, a) in zip(LAYERS, combo))
            best = loss if best is None else min(best, loss)
    assert alloc.estimated_loss == pytest.approx(best, rel=1e-9)
    assert alloc.avg_bits <= 4.0 and alloc.bops_ratio <= 1.0


def test_recipe_size_and_metric_match_an_independent_recount(alloc, digits):
    model, calib, x, y = digits
    assert list(alloc.bits) == LAYERS
    q = lowbit.quantize(model, calib, alloc.recipe, calib[:1], show_progress=False)
    for name, b in alloc.bits.items():
        w, a = q.lowbit_info.recipe.resolve(name, type(getattr(model, name)).__name__)
        assert w.bits == min(b["weight_bits"], machine_weight_bits()) and a.bits == b["act_bits"]
    with torch.no_grad():
        assert accuracy(q(x), y) == alloc.metric
    params = _params(model)
    total = sum(p.numel() for p in model.parameters())  # the float model, BatchNorm not folded yet
    folded = sum(m.weight.numel() + m.out_channels for m in (getattr(model, n) for n in LAYERS[:-1])) + 32 * 10 + 10
    channels = sum(getattr(model, n).weight.shape[0] for n in LAYERS)
    bits = sum(params[n] * b["weight_bits"] for n, b in alloc.bits.items())
    expected = (bits + 32 * (folded - sum(params.values())) + 40 * channels) / 8 / 1e6
    assert total > folded  # the float model still has its BatchNorm parameters
    assert alloc.predicted_size_mb == pytest.approx(expected, rel=1e-12)


def test_loss_estimate_is_the_one_layer_quantized_kl(alloc, digits):
    """fc alone at W4A8 (every other layer float by recipe) reproduces the table entry."""
    model, calib, _, _ = digits
    r = lowbit.preset("int8")
    layer = next(l for l in measure_layers(lowbit.quantize(model, calib, r, calib[:1], show_progress=False), calib[:1])
                 if l.name == "fc")
    recipe = r.with_rules(LayerRule("fc", *option_specs(r, layer, 4, 8))).keep_float(*LAYERS[:-1], "add", "pool")
    q = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
    with torch.no_grad():
        kl = kl_softmax(float_copy(q)(calib[:32]), q(calib[:32]))
    assert alloc.losses["fc"]["w4a8"] == pytest.approx(kl, rel=1e-6)


def test_macs_and_params_by_hand(digits):
    model, calib, _, _ = digits
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[:1], show_progress=False)
    layers = {l.name: l for l in measure_layers(q, calib[:1])}
    assert {n: l.macs for n, l in layers.items()} == MACS
    assert {n: l.params for n, l in layers.items()} == _params(model)


def test_pareto_points_are_measured_and_flagged(alloc):
    pts = alloc.pareto
    assert [p["size_mb"] for p in pts] == sorted(p["size_mb"] for p in pts)
    on = front([(p["size_mb"], p["metric"]) for p in pts])
    assert [p["on_front"] for p in pts] == [i in on for i in range(len(pts))]
    chosen = [p for p in pts if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["metric"] == alloc.metric
    smallest, largest = pts[0], pts[-1]
    assert smallest["avg_bits"] == 2.0 and largest["bits"] == {"w8a8": 5}
    assert largest["metric"] >= smallest["metric"]


def test_option_specs_cap_8_bits_for_the_cpu_and_use_minmax_at_16(digits):
    r = lowbit.preset("int8")
    layer = measure_layers(lowbit.quantize(digits[0], digits[1], r, digits[1][:1], show_progress=False),
                           digits[1][:1])[0]
    w, a = option_specs(r, layer, 8, 16)
    assert w.bits == machine_weight_bits() and w.granularity == r.default_weight.granularity
    assert a.bits == 16 and a.calibrator == "minmax"
    w, a = option_specs(r, layer, 2, 8)
    assert w.bits == 2 and a == r.default_input


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a budget"), ({"avg_bits": 4, "weight_bits": (1, 4)}, "weight_bits"),
    ({"avg_bits": 4, "act_bits": (32,)}, "act_bits"), ({"avg_bits": -1}, "avg_bits"),
    ({"size_budget_mb": 0.001}, "smallest is"),
])
def test_bad_budgets_are_refused(digits, kwargs, match):
    model, calib, x, _ = digits
    with pytest.raises(ValueError, match=match):
        allocate_bits(model, calib, x, lowbit.preset("int8"), example_input=calib[:1], pareto_points=0, **kwargs)
