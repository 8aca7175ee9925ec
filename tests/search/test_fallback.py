"""Fallback search on digits-cnn: the target holds, no smaller float set does (exhaustive check), budgets,
messages, custom metrics, given rankings."""

from __future__ import annotations

import itertools

import pytest
import torch

import lowbit
from lowbit.analysis.metrics import accuracy, kl_softmax, top1_agreement
from lowbit.search import CandidateBuilder, Target, fallback, ranking_from_analysis
from lowbit.search.candidates import quantized_layers


N_EVAL = 200  # enough for a 0.99 target to need several float layers, small enough for the exhaustive check


@pytest.fixture(scope="module")
def found(digits, coarse):
    model, calib, x, _ = digits
    return fallback(model, calib, x[:N_EVAL], coarse, min_agreement=0.99, example_input=calib[:1])


def _agreement(model, recipe, calib, x):
    q = lowbit.quantize(model, calib, recipe, calib[:1], show_progress=False)
    with torch.no_grad():
        return top1_agreement(lowbit.search.scoring.float_copy(q)(x), q(x))


def test_target_met_and_recipe_reproduces_it(found, digits, coarse):
    model, calib, x, _ = digits
    x = x[:N_EVAL]
    assert found.met and found.verified and found.float_layers
    assert found.agreement >= 0.99
    assert found.agreement == _agreement(model, found.recipe, calib, x)
    assert found.recipe == coarse.keep_float(*found.float_layers)
    assert found.history[0]["stage"] == "base" and found.history[0]["agreement"] < 0.9
    assert found.message == f"target agreement 0.99 met with {len(found.float_layers)} layers float ({found.agreement:.4f})"


def test_no_smaller_float_set_meets_the_target(found, digits, coarse):
    """Exhaustive: every set of fewer layers kept float fails the target (so the search found a minimum)."""
    model, calib, x, _ = digits
    x = x[:N_EVAL]
    builder = CandidateBuilder(model, calib, calib[:1])
    layers = [n for n, _ in quantized_layers(builder.build(coarse))]
    ref = lowbit.search.scoring.float_copy(builder.build(coarse))
    with torch.no_grad():
        ref_out = ref(x)
        for k in range(len(found.float_layers)):
            for subset in itertools.combinations(layers, k):
                q = builder.build(coarse.keep_float(*subset))
                assert top1_agreement(ref_out, q(x)) < 0.99, subset


def test_float_ranking_measures_every_layer_and_is_sorted(found):
    assert found.rank_by == "float"  # "auto": seven cheap candidates fit in the budget
    gains = [r["score"] for r in found.ranking]
    assert all(r["measured"] for r in found.ranking) and len(found.ranking) == 7
    assert gains == sorted(gains, reverse=True)
    ranked = [h for h in found.history if h["stage"] == "rank"]
    base_loss = found.history[0]["loss"]
    by_layer = {h["float_layers"][0]: base_loss - h["loss"] for h in ranked}
    assert {r["layer"]: r["score"] for r in found.ranking} == by_layer


def test_quantized_ranking_is_the_one_layer_quantized_kl(digits, coarse):
    """rank_by="quantized": each score is the KL of a recipe quantizing that layer alone (checked for fc)."""
    model, calib, x, _ = digits
    res = fallback(model, calib, x[:N_EVAL], coarse, min_agreement=0.99, rank_by="quantized", rank_samples=64,
                   example_input=calib[:1], prune=False, verify=False)
    assert res.rank_by == "quantized" and not any(h["stage"] == "rank" for h in res.history)
    scores = {r["layer"]: r["score"] for r in res.ranking}
    assert list(scores.values()) == sorted(scores.values(), reverse=True) and len(scores) == 7
    others = [n for n in scores if n != "fc"]
    q = lowbit.quantize(model, calib, coarse.keep_float(*others), calib[:1], show_progress=False)
    with torch.no_grad():
        kl = kl_softmax(lowbit.search.scoring.float_copy(q)(x[:64]), q(x[:64]))
    assert scores["fc"] == pytest.approx(kl, rel=1e-6)
    assert res.met


def test_unreachable_target_reports_best_so_far(digits, coarse):
    model, calib, x, _ = digits
    res = fallback(model, calib, x, coarse, min_agreement=0.99, budget_seconds=1e-6, example_input=calib[:1])
    assert not res.met and res.out_of_budget and res.float_layers == ()
    assert res.message == f"target agreement 0.99 not met: best {res.agreement:.4f} with 0 layers float (time budget spent)"


def test_max_drop_on_accuracy_and_a_given_ranking(digits, coarse):
    model, calib, x, y = digits
    metric = lambda ref, out: accuracy(out, y)  # noqa: E731
    order = ["fc", "pool", "add", "down_conv", "res_conv2", "res_conv1", "conv1"]  # worst order on purpose
    res = fallback(model, calib, x, coarse, max_drop=0.01, metric_fn=metric, ranking=order, prune=False,
                   example_input=calib[:1])
    assert res.met and res.metric_fp32 - res.metric <= 0.01
    assert not any(h["stage"] == "rank" for h in res.history)
    assert res.ranking[0] == {"layer": "fc", "score": None, "measured": False} and res.rank_by == "given"
    q = lowbit.quantize(model, calib, res.recipe, calib[:1], show_progress=False)
    with torch.no_grad():
        assert accuracy(q(x), y) == res.metric


def test_met_base_needs_no_float_layer(digits):
    model, calib, x, _ = digits
    res = fallback(model, calib, x, lowbit.preset("int8"), min_agreement=0.99, example_input=calib[:1])
    assert res.met and res.float_layers == () and len(res.history) == 1 and res.recipe == lowbit.preset("int8")


def test_ranking_from_analysis_orders_by_recovery_then_sqnr():
    rows = [{"layer": "a", "recovery": 0.01, "sqnr_db_isolated": 30.0},
            {"layer": "b", "recovery": "not measured", "sqnr_db_isolated": 10.0},
            {"layer": "c", "recovery": 0.05, "sqnr_db_isolated": 40.0},
            {"layer": "d", "recovery": "not measured", "sqnr_db_isolated": 5.0}]
    assert ranking_from_analysis({"rows": rows}) == ["c", "a", "d", "b"]


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a target"), ({"min_agreement": 1.5}, "min_agreement"), ({"max_drop": -1.0}, "max_drop"),
    ({"min_agreement": 0.9, "ranking": ["nope"]}, "not a quantized layer"),
    ({"min_agreement": 0.9, "budget_seconds": 0}, "budget_seconds"),
])
def test_bad_arguments_are_refused(digits, coarse, kwargs, match):
    model, calib, x, _ = digits
    with pytest.raises(ValueError, match=match):
        fallback(model, calib, x, coarse, example_input=calib[:1], **kwargs)


def test_target_logic():
    from lowbit.search import Score
    t = Target(min_agreement=0.99, max_drop=0.01)
    assert t.met(Score(0.95, 0.99, 0.0), 0.96) and not t.met(Score(0.94, 0.995, 0.0), 0.96)
    assert not t.met(Score(0.96, 0.98, 0.0), 0.96)
    assert t.describe() == "agreement 0.99 and metric drop 0.01"
