"""Layer-wise error of a converted (fake-quantized) model, streamed over the data batch by batch.

For every quantized *site* (Conv / Linear module, pool, residual add, ...) the error of the site's OUTPUT
is measured against the FP32 output of the same site (every quantizer disabled):

* isolated: only this site's quantizers on (its weight quantizer and the quantizers of its inputs),
  applied to the site's FP32 input — one call of the site per batch, no extra forward pass;
  also weight-only and input-only variants;
* cumulative: every quantizer on. Quantizers that run after a site cannot change its output, so one
  fully quantized pass gives every site's cumulative error ("all quantizers up to and including it").

Only running sums are kept (:class:`ErrorStats`), so a figure over several batches equals the one over
all the data at once:

    SQNR = 10 · log10(Σ ref² / Σ (ref − out)²)     cosine = Σ ref·out / sqrt(Σ ref² · Σ out²)
    MSE  = Σ (ref − out)² / n

During the analysis the engine-kernel emulation is switched off (``lowbit.nn.set_engine_emulation``): the
emulation fuses the *consumer's* input quantizer (and a ReLU) into the layer's output, which would make a layer's output incomparable with its FP32 output. The error of that requantization
is attributed to the consumer's input quantizer instead.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from lowbit.nn import QuantLayerMixin, TensorQuantizer, set_engine_emulation

log = logging.getLogger(__name__)

MAX_WALK = 8  # pass-through ops crossed when looking for the quantizer of a site's input


@dataclass
class ErrorStats:
    """Running sums for SQNR / cosine / MSE of ``out`` against ``ref`` (float64)."""

    n: int = 0
    _sums: torch.Tensor | None = None  # [Σref², Σ(ref−out)², Σref·out, Σout²] on the tensors' device

    def update(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        """Add one batch: ``Σref²``, ``Σ(ref−out)²``, ``Σref·out``, ``Σout²`` and the element count.

        The sums stay on the tensors' device (no wait for a GPU per batch); reading a figure copies them once.
        """
        r, o = ref.detach().double(), out.detach().double()
        sums = torch.stack([r.pow(2).sum(), (r - o).pow(2).sum(), (r * o).sum(), o.pow(2).sum()])
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)
        self.n += r.numel()

    def _sum(self, i: int) -> float:
        return 0.0 if self._sums is None else float(self._sums[i])

    @property
    def ref2(self) -> float:
        return self._sum(0)

    @property
    def err2(self) -> float:
        return self._sum(1)

    @property
    def dot(self) -> float:
        return self._sum(2)

    @property
    def out2(self) -> float:
        return self._sum(3)

    def sqnr_db(self) -> float | None:
        """``10 · log10(Σ ref² / Σ (ref − out)²)``; ``inf`` when identical, None when nothing was seen."""
        if self.n == 0 or math.isnan(self.err2) or math.isnan(self.ref2):
            return None
        if self.err2 == 0:
            return math.inf
        if self.ref2 == 0:
            return -math.inf
        return 10.0 * math.log10(self.ref2 / self.err2)

    def cosine(self) -> float | None:
        """``Σ ref·out / sqrt(Σ ref² · Σ out²)`` (1.0 when both are zero)."""
        if self.n == 0 or math.isnan(self.dot):
            return None
        if self.ref2 == 0 and self.out2 == 0:
            return 1.0
        if self.ref2 == 0 or self.out2 == 0:
            return 0.0
        return self.dot / math.sqrt(self.ref2 * self.out2)

    def mse(self) -> float | None:
        """``Σ (ref − out)² / n``."""
        return None if self.n == 0 else self.err2 / self.n


class FunctionSite(nn.Module):
    """A functional op (``x + y``, ``torch.cat``, ...) wrapped in a module so it can be hooked and called."""

    def __init__(self, fn, name: str) -> None:
        super().__init__()
        self.fn = fn
        self.layer_name = name

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@dataclass
class Site:
    """One quantized site: its module, weight quantizer and the quantizer of each positional input."""

    name: str
    kind: str
    module: nn.Module
    weight_quantizer: TensorQuantizer | None
    input_quantizers: list[TensorQuantizer | None] = field(default_factory=list)
    own_input_quantizer: TensorQuantizer | None = None

    @property
    def quantizers(self) -> list[TensorQuantizer]:
        """Every quantizer of this site (weight first), whatever its current ``enabled`` switch."""
        qs = [self.weight_quantizer, self.own_input_quantizer, *self.input_quantizers]
        out: list[TensorQuantizer] = []
        for q in qs:
            if q is not None and all(q is not o for o in out):
                out.append(q)
        return out

    @property
    def depthwise(self) -> bool:
        """True for a grouped conv with one input channel per group."""
        groups = getattr(self.module, "groups", 1)
        return groups > 1 and groups == getattr(self.module, "in_channels", -1)


def unlink_engine(model: nn.Module) -> None:
    """Remove the engine-kernel links (see module doc) so every site computes in plain fake-quant float."""
    set_engine_emulation(model, False)


def _act_quantizer(gm: fx.GraphModule, node) -> TensorQuantizer | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, TensorQuantizer):
            return mod
    return None


def _input_quantizer_of(gm: fx.GraphModule, arg, site_nodes: set) -> TensorQuantizer | None:
    """The activation quantizer feeding ``arg``, walking up through single-input pass-through ops."""
    for _ in range(MAX_WALK):
        if not isinstance(arg, fx.Node) or arg in site_nodes:
            return None
        q = _act_quantizer(gm, arg)
        if q is not None:
            return q if q.is_active else None
        if arg.op not in ("call_module", "call_function", "call_method") or not arg.args:
            return None
        arg = arg.args[0]
    return None


def _wrap_function(gm: fx.GraphModule, node: fx.Node, name: str) -> nn.Module:
    holder = gm.get_submodule("lowbit_sites") if hasattr(gm, "lowbit_sites") else None
    if holder is None:
        holder = nn.ModuleDict()
        gm.add_module("lowbit_sites", holder)
    key = re.sub(r"[^0-9A-Za-z_]", "_", name)
    mod = FunctionSite(node.target, name)
    holder[key] = mod
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(f"lowbit_sites.{key}", node.args, node.kwargs)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return mod


def _site_node(gm: fx.GraphModule, name: str) -> fx.Node | None:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if str(node.target) == name or getattr(mod, "layer_name", None) == name and not isinstance(mod, TensorQuantizer):
                return node
        elif node.name == name and node.op in ("call_function", "call_method"):
            return node
    return None


def find_sites(model: nn.Module) -> list[Site]:
    """Every quantized site of a converted model (graph order when traced), made hookable.

    Functional sites of a traced model are replaced, in ``model`` itself, by :class:`FunctionSite`
    modules (call on a copy).
    """
    info = getattr(model, "lowbit_info", None)
    kinds = dict(info.layer_kinds) if info else {n: type(m).__name__ for n, m in model.named_modules()
                                                   if isinstance(m, QuantLayerMixin)}
    if not isinstance(model, fx.GraphModule):
        return [_layer_site(n, kinds[n], model.get_submodule(n), []) for n in kinds]
    found: list[tuple[str, fx.Node]] = []
    for name in kinds:
        node = _site_node(model, name)
        if node is None:
            log.warning("site %s not found in the graph; skipped", name)
            continue
        if node.op != "call_module":
            if node.op == "call_method":
                log.warning("site %s is a method call; skipped", name)
                continue
            _wrap_function(model, node, name)
            node = _site_node(model, name)
        found.append((name, node))
    model.recompile()
    nodes = {n for _, n in found}
    sites = []
    for name, node in found:
        qs = [_input_quantizer_of(model, a, nodes) for a in node.args]
        sites.append(_layer_site(name, kinds[name], model.get_submodule(str(node.target)), qs))
    return sites


def _layer_site(name: str, kind: str, mod: nn.Module, input_qs: list) -> Site:
    if isinstance(mod, QuantLayerMixin):
        own = mod.input_quantizer if mod.input_quantizer.is_active else None
        wq = mod.weight_quantizer if mod.weight_quantizer.is_active else None
        return Site(name, kind, mod, wq, input_qs, own)
    return Site(name, kind, mod, None, input_qs, None)


class QuantizerSwitch:
    """Switch the model's active quantizers on and off (``enabled``), restoring them at the end."""

    def __init__(self, model: nn.Module) -> None:
        self.controlled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_active]
        self._saved = [q.enabled for q in self.controlled]

    def only(self, on) -> None:
        """Enable exactly the quantizers in ``on`` (by identity) among the controlled ones."""
        ids = {id(q) for q in on}
        for q in self.controlled:
            q.enabled = id(q) in ids

    def all(self, enabled: bool = True) -> None:
        """Enable (or disable) every controlled quantizer."""
        for q in self.controlled:
            q.enabled = enabled

    def restore(self) -> None:
        """Put back the states found at construction."""
        for q, was in zip(self.controlled, self._saved):
            q.enabled = was


def call_site(site: Site, args: tuple, kwargs: dict, switch: QuantizerSwitch, weight: bool, inputs: bool):
    """Run ``site`` alone on (FP32) ``args`` with its weight and/or input quantizers on; restores state after.

    The quantizers of the inputs live in the graph, outside the module, so they are applied here:
    ``out = site(Q_in(x); Q_w(W))``.
    """
    states = [q.enabled for q in switch.controlled]
    on = []
    if weight and site.weight_quantizer is not None:
        on.append(site.weight_quantizer)
    if inputs:
        on += [q for q in (site.own_input_quantizer, *site.input_quantizers) if q is not None]
    switch.only(on)
    try:
        if inputs:
            args = tuple(q(a) if q is not None and isinstance(a, torch.Tensor) else a
                         for a, q in zip(args, site.input_quantizers + [None] * len(args)))
        return site.module(*args, **kwargs)
    finally:
        for q, was in zip(switch.controlled, states):
            q.enabled = was


def first_output(out):
    """The model's output tensor (first element of a tuple / list, ``logits`` of a dict-like output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_output(out[0])
    if isinstance(out, dict) and out:
        return first_output(out.get("logits", next(iter(out.values()))))
    raise TypeError(f"cannot read a tensor from a model output of type {type(out).__name__}")
