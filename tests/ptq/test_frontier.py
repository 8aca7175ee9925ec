"""The activation frontier gives the layer-wise passes exactly what re-running the model up to each layer gives.

Reference: the same pass with the frontier switched off (``lowbit.ptq.frontier._graph_stepper`` returning no
stepper makes ``visit_layers`` re-run the model up to every layer, the pre-frontier code path). Results must be
bit-identical: the frontier executes the very same graph nodes on the very same tensors.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import fx, nn

import lowbit
from lowbit.ptq import frontier
from lowbit.ptq.capture import ForwardLoop, layer_order
from lowbit.ptq.passes import quantize


_GRAPH_STEPPER = frontier._graph_stepper


def _w4(recipe):
    return replace(recipe, default_weight=replace(recipe.default_weight, bits=4))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _run(model, calib, recipe, monkeypatch, mode: str, budget: int | None = None, batch=None):
    calls = {"stepped": 0}

    def spy(*args):
        if mode == "rerun":
            return None, None
        stepper, order = _GRAPH_STEPPER(*args)
        calls["stepped"] += stepper is not None
        return stepper, order

    monkeypatch.setattr(frontier, "_graph_stepper", spy)
    monkeypatch.setattr(frontier, "DEFAULT_BUDGET_BYTES", frontier.DEFAULT_BUDGET_BYTES if budget is None else budget)
    q = quantize(copy.deepcopy(model), calib, recipe, batch if batch is not None else calib[0][:1],
                 show_progress=False)
    return q, calls


@pytest.mark.parametrize("passes", [("gptq", "bias_correction"), ("adaround",)])
def test_frontier_equals_rerunning_up_to_each_layer(digits, monkeypatch, passes):
    model, calib_all, _, _ = digits
    calib = list(calib_all[:96].split(32))
    recipe = _w4(lowbit.preset("int8")).with_passes(*passes)
    ref, _ = _run(model, calib, recipe, monkeypatch, "rerun")
    got, calls = _run(model, calib, recipe, monkeypatch, "frontier")
    assert isinstance(got, fx.GraphModule) and calls["stepped"] >= 1
    a, b = _state(ref), _state(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_tiny_budget_replays_batches_with_the_same_result(digits, monkeypatch):
    model, calib_all, _, _ = digits
    calib = list(calib_all[:96].split(32))
    recipe = _w4(lowbit.preset("int8")).with_passes("gptq", "bias_correction")
    ref, _ = _run(model, calib, recipe, monkeypatch, "frontier")
    seen = {}
    original_feed = frontier._Stepper.feed

    def feed(self, *args, **kwargs):
        seen["replayed"] = max(seen.get("replayed", 0), len(self.replayed))
        seen["resident"] = min(seen.get("resident", 99), len(self.envs))
        return original_feed(self, *args, **kwargs)

    monkeypatch.setattr(frontier._Stepper, "feed", feed)
    got, _ = _run(model, calib, recipe, monkeypatch, "frontier", budget=1)
    assert seen == {"replayed": 2, "resident": 1}  # one batch always stays; the other two are replayed
    a, b = _state(ref), _state(got)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, y):
        return self.head(torch.relu(self.a(x)) + self.b(y).sigmoid())


def test_graph_steps_equal_the_forward_for_dict_and_tuple_batches():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_TwoInputs().eval())
    graph = frontier._Graph(gm)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    env = graph.bind({"y": y, "x": x})
    assert torch.equal(env[graph.placeholders[0]], x) and torch.equal(env[graph.placeholders[1]], y)
    graph.run(env, 0, len(graph.nodes) - 1)
    out = graph.node_args(graph.nodes[-1], env)[0][0]
    assert torch.equal(out, gm(x, y))
    # values are freed after their last use: only what the output reads is left
    assert set(env) == set(graph.nodes[-1].all_input_nodes)
    with pytest.raises(TypeError):
        graph.bind((x, "label"))  # a tuple feeds only its first element: y is missing


def test_visit_layers_order_matches_execution_order(digits, monkeypatch):
    model, calib_all, _, _ = digits
    calib = list(calib_all[:64].split(32))
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[0][:1], show_progress=False)
    loop = ForwardLoop(calib)
    visited = []
    for name, layer, feed in frontier.visit_layers(q, loop, lambda m: True):
        n = feed(on_input=lambda x: None)
        assert n == len(calib)
        visited.append(name)
    assert visited == [n for n, _ in layer_order(q, loop)]


def test_frontier_inputs_equal_hooked_inputs(digits):
    """Every layer's input from the frontier equals what a forward hook sees in a plain forward pass."""
    model, calib_all, _, _ = digits
    calib = list(calib_all[:64].split(32))
    q = lowbit.quantize(model, calib, lowbit.preset("int8"), calib[0][:1], show_progress=False)
    hooked: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, n=n: hooked.setdefault(n, []).append(a[0].clone()))
               for n, m in layer_order(q, ForwardLoop(calib))]
    with torch.no_grad():
        for b in calib:
            q(b)
    for h in handles:
        h.remove()
    for name, layer, feed in frontier.visit_layers(q, ForwardLoop(calib), lambda m: True):
        got = []
        feed(on_input=lambda x: got.append(x.clone()))
        assert len(got) == len(hooked[name]) and all(torch.equal(a, b) for a, b in zip(got, hooked[name])), name
