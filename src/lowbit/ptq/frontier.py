"""One forward pass per pass: step a captured graph layer by layer, keeping every batch's live activations.

The layer-wise passes (GPTQ, AdaRound, bias correction) visit the quantized layers in execution order, and
each layer must see its inputs *as the model stands*, every earlier layer already changed. Re-running the
network up to each layer costs ``Σ_l cost(0..l)``, about ``L/2`` forward passes for ``L`` layers. Since the
layers before the one being visited never change again, their activations can be kept instead: for a
``torch.fx.GraphModule`` the graph is executed node by node on every batch, holding only the values still
needed by later nodes (the *frontier*), and execution pauses at each visited layer's node::

    for each visited layer l (in graph order):
        advance every batch's frontier to node(l)        (each node runs once per batch in the whole pass)
        the pass reads node(l)'s inputs, changes l       (moments, rounding, bias shift)
        node(l) then runs with the changed layer

The frontier of all batches is bounded by ``budget_bytes``: when it would grow past it, the last resident
batches are dropped and *replayed* from the model input for each visited layer (the old cost, for those
batches only); one batch always stays resident. A budget of 0 turns the frontier off. Models that are not graphs (module swap) fall back to
re-running the model up to each layer (:func:`lowbit.ptq.capture.run_until`).
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn

from lowbit.data import batch_args
from lowbit.device import model_device, to_device
from lowbit.progress import progress_steps
from lowbit.ptq.capture import ForwardLoop, layer_order, run_until

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 2 * 2**30  # 2 GiB of kept activations
Feed = Callable[..., int]  # feed(on_input=None, on_output=None) -> number of batches fed


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors inside ``value`` (nested tuples / lists / dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


class _Graph:
    """The node list of a GraphModule, with where each value is last used and how batches bind to inputs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.free_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        last: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last[used] = i
        for node, i in last.items():
            self.free_after[i].append(node)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.signature = inspect.signature(gm.forward)

    def bind(self, batch: Any) -> dict[fx.Node, Any]:
        """The placeholder values of one batch (``lowbit.data.run_batch``'s conventions), on the model's device."""
        args, kwargs = batch_args(to_device(batch, model_device(self.gm)))
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return {n: bound.arguments[n.target] for n in self.placeholders}

    def run(self, env: dict[fx.Node, Any], start: int, stop: int) -> None:
        """Execute nodes ``start .. stop-1`` on ``env``, freeing values after their last use."""
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op not in ("placeholder", "output"):
                env[node] = self.run_node(node, env)
            for dead in self.free_after[i]:
                env.pop(dead, None)

    def run_node(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args, kwargs = self.node_args(node, env)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise NotImplementedError(f"fx node op {node.op!r}")

    @staticmethod
    def node_args(node: fx.Node, env: dict[fx.Node, Any]) -> tuple[tuple, dict]:
        return (fx.node.map_arg(node.args, env.__getitem__), fx.node.map_arg(node.kwargs, env.__getitem__))


def _layer_nodes(graph: _Graph, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module, int]] | None:
    """``(name, layer, node index)`` of each layer's first call in the graph, in graph order; None when a
    layer is not called from the top-level graph (then the graph cannot be paused at it)."""
    first: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        if node.op == "call_module":
            first.setdefault(id(graph.gm.get_submodule(node.target)), i)
    out = []
    for name, layer in layers:
        if id(layer) not in first:
            return None
        out.append((name, layer, first[id(layer)]))
    return sorted(out, key=lambda t: t[2])


class _Stepper:
    """Every batch's frontier, advanced together through the graph (see the module docstring)."""

    def __init__(self, graph: _Graph, loop: ForwardLoop, budget_bytes: int) -> None:
        self.graph, self.loop, self.budget = graph, loop, budget_bytes
        # batches 0 .. len(envs)-1 keep a frontier; the rest (always a suffix) are replayed from the input
        self.envs: list[dict[fx.Node, Any]] = []
        self.batches = 0
        self.pos = 0
        self.peak = 0
        held = 0
        for batch in loop.batches():
            self.batches += 1
            if self.envs and held > self.budget:
                continue
            env = graph.bind(batch)
            held += tensor_bytes(list(env.values()))
            self.envs.append(env)
        if not self.envs:
            raise ValueError("calibration data is empty: no batch was seen")

    @property
    def replayed(self) -> range:
        """Indices of the batches without a kept frontier."""
        return range(len(self.envs), self.batches)

    def advance(self, stop: int) -> None:
        """Run every resident frontier up to (not including) node ``stop``; drop frontiers over the budget."""
        held = 0
        for k, env in enumerate(self.envs):
            self.graph.run(env, self.pos, stop)
            held += tensor_bytes(list(env.values()))
            if k > 0 and held > self.budget:
                del self.envs[k:]
                log.info("frontier over %.0f MiB at node %d: %d batch(es) replayed from the input",
                         self.budget / 2**20, stop, len(self.replayed))
                held = sum(tensor_bytes(list(e.values())) for e in self.envs)
                break
        self.peak = max(self.peak, held)
        self.pos = stop

    def feed(self, index: int, layer: nn.Module, on_input: Callable | None = None,
             on_output: Callable | None = None) -> int:
        """Give ``on_input(x)`` / ``on_output(layer(x))`` the layer's input at node ``index`` for every batch."""
        node = self.graph.nodes[index]

        def visit(env):
            args, kwargs = self.graph.node_args(node, env)
            if on_input is not None:
                on_input(args[0])
            if on_output is not None:
                on_output(layer(*args, **kwargs))

        with torch.no_grad():
            for env in self.envs:  # batches in order (kept ones first), so sums do not depend on the budget
                visit(env)
            if self.replayed:
                for batch in itertools.islice(self.loop.batches(), len(self.envs), None):
                    env = self.graph.bind(batch)
                    self.graph.run(env, 0, index)
                    visit(env)
        return self.batches


def visit_layers(model: nn.Module, loop: ForwardLoop, select: Callable[[nn.Module], bool],
                 budget_bytes: int | None = None, description: str = "layers") -> Iterator[tuple[str, nn.Module, Feed]]:
    """The selected quantized layers in execution order, each with ``feed(on_input=, on_output=)`` giving
    the layer's inputs (or outputs) on every calibration batch with all earlier layers as they stand.

    The caller may change the layer before asking for the next one; the change is seen downstream. On a
    GraphModule this costs one forward pass in all (plus replays past ``budget_bytes``); otherwise, or with
    ``budget_bytes=0``, one forward up to each layer.
    """
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    stepper, order = _graph_stepper(model, loop, select, budget) if budget > 0 else (None, None)
    if stepper is None:
        chosen = [(n, m) for n, m in layer_order(model, loop) if select(m)]
        for name, layer in progress_steps(chosen, description):
            yield name, layer, lambda on_input=None, on_output=None, layer=layer: run_until(
                model, loop, layer, on_input, on_output)
        return
    # no grad-mode context around the yield: it would leak into the caller's loop body
    for name, layer, index in progress_steps(order, description):
        with torch.no_grad():
            stepper.advance(index)
        yield name, layer, lambda on_input=None, on_output=None, layer=layer, index=index: stepper.feed(
            index, layer, on_input, on_output)
    log.info("frontier: %d batch(es) kept (peak %.1f MiB), %d replayed", len(stepper.envs), stepper.peak / 2**20,
             len(stepper.replayed))


def _graph_stepper(model: nn.Module, loop: ForwardLoop, select: Callable[[nn.Module], bool], budget: int):
    """A :class:`_Stepper` and the layer nodes to visit, or ``(None, None)`` when the model cannot be stepped."""
    from lowbit.nn import QuantLayerMixin

    if not isinstance(model, fx.GraphModule) or loop.is_callable_only:
        return None, None
    graph = _Graph(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin) and select(m)]
    order = _layer_nodes(graph, layers)
    if order is None:
        log.info("a quantized layer is called inside a submodule: re-running the model up to each layer")
        return None, None
    try:
        stepper = _Stepper(graph, loop, budget)
    except TypeError as exc:  # a batch that does not bind to the graph's inputs
        log.info("batches do not bind to the graph inputs (%s): re-running the model up to each layer", exc)
        return None, None
    return stepper, order
