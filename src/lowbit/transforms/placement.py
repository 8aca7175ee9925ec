"""Where activation quantizers go: one shared quantizer per consumed tensor, plus the engine's needs.

Inputs: every quantized site (``graph.find_sites``) asks for its input tensors quantized; the request walks up
through pass-through ops (``graph.quantization_point``) and requests for the same tensor and spec share ONE
quantizer. For ONNX Runtime also (see ``transforms.engine_ops``): each integer-kernel op gets a quantizer on its
output, and a quantizer crossed by flatten / view is applied again after it (``nn.Requantize``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.core import QuantSpec
from lowbit.nn import QUANT_MODULES, Requantize, TensorQuantizer
from lowbit.transforms.engine_ops import FLOAT_OUTPUT_OK, output_point
from lowbit.transforms.graph import (GraphPlan, _activation_spec, _key, producer_bounds, quantization_point)
from lowbit.transforms.recipe import Recipe


Use = tuple  # (consuming Site or None for an output demand, node to rewire, tensor it read)
# Targets whose integer kernels need a quantizer on their output as well as on their inputs.
INTEGER_IO_TARGETS = ("onnxruntime", "litert")
# LiteRT kernels that need the same qparams on input and output (AVERAGE_POOL_2D): their output re-applies the
# input's quantizer (``nn.Requantize``) instead of getting its own. Max pools need the same on every target and are
# crossed like data movement (``graph.PASS_MODULES``), so a Requantize follows them anyway.
LITERT_SHARED_POOLS = (nn.AvgPool1d, nn.AvgPool2d)


def _input_demands(gm: fx.GraphModule, plan: GraphPlan, recipe: Recipe, demands: dict, requants: list) -> None:
    for site in plan.sites:
        if site.input is None:
            continue
        for arg in site.inputs:
            src, user = quantization_point(gm, arg, site.node)
            spec = _activation_spec(site.input, producer_bounds(gm, src), recipe)
            demands.setdefault((src, spec), []).append((site, user, arg))
            if recipe.target in INTEGER_IO_TARGETS and src is not arg and _moves_data(gm, arg, src):
                requants.append((src, spec, site.node, arg))


def _moves_data(gm: fx.GraphModule, arg: fx.Node, src: fx.Node) -> bool:
    """True when the chain ``src → … → arg`` holds an op other than zero padding (flatten, view, reshape)."""
    node = arg
    while node is not src:
        if not (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ZeroPad2d)) and \
                not (node.op == "call_function" and node.target is F.pad):
            return True
        node = node.args[0]
    return False


def _output_demands(gm: fx.GraphModule, plan: GraphPlan, recipe: Recipe, demands: dict) -> None:
    """ONNX Runtime fuses Conv, Add, Mul, Sigmoid, pools… into integer kernels only with a Q on their output: give
    each one (after the ReLU/ReLU6 it folds), whatever reads it. Linear and matmul fuse without one."""
    if recipe.target not in INTEGER_IO_TARGETS:
        return
    site_nodes = {site.node for site in plan.sites}
    float_ok = FLOAT_OUTPUT_OK if recipe.target == "onnxruntime" else ()  # a LiteRT FULLY_CONNECTED needs one
    for site in plan.sites:
        if site.input is None or (site.kind == "pool" and not site.inputs):
            continue
        if recipe.target == "litert" and _shared_qparams_pool(gm, site.node):
            continue  # re-applies its input's quantizer (see _insert_shared_pools)
        out = output_point(site.node, lambda n: producer_bounds(gm, n) is not None or _is_batchnorm(gm, n))
        # a Conv/Linear kept float by a rule reads the float tensor: behind a DQ, ONNX Runtime would quantize its
        # float weight itself (WeightBiasQuantization) and run it in INT8 against the recipe
        users = [u for u in out.users if not _float_layer_call(gm, u, site_nodes)]
        if not users or site.kind in float_ok:
            continue
        spec = _activation_spec(site.input, producer_bounds(gm, out), recipe)
        if recipe.target == "litert" and any(u.op == "output" for u in users):
            # the model's output codes (logits): a clipping calibrator would flatten the top classes
            spec = replace(spec, calibrator="minmax")
        known = demands.setdefault((out, spec), [])
        rewired = {user for _, user, _ in known}
        known.extend((None, user, out) for user in users if user not in rewired)


def _shared_qparams_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An average pool with a window (not a global mean): LiteRT needs its output qparams = its input's."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), LITERT_SHARED_POOLS)
    return node.op == "call_function" and node.target is F.avg_pool2d


def _shared_pool_requants(gm: fx.GraphModule, plan: GraphPlan, recipe: Recipe) -> list:
    """``(pool node, its input)`` for each LiteRT pool whose output must keep its input's qparams."""
    if recipe.target != "litert":
        return []
    return [(s.node, s.inputs[0]) for s in plan.sites
            if s.input is not None and s.inputs and _shared_qparams_pool(gm, s.node)]


def _insert_shared_pools(gm: fx.GraphModule, holder: nn.ModuleDict, shared: list) -> None:
    for pool, arg in shared:
        qnode = pool.args[0]
        source = _quantizer_of(gm, qnode)
        if source is None:
            continue
        key = _key(f"{pool.name}_shared_out")
        holder[key] = Requantize(source)
        with gm.graph.inserting_after(pool):
            rnode = gm.graph.call_module(f"lowbit_act.{key}", (pool,))
        pool.replace_all_uses_with(rnode, delete_user_cb=lambda u: u is not rnode)


def _quantizer_of(gm: fx.GraphModule, node: fx.Node) -> TensorQuantizer | None:
    """The activation quantizer ``node`` applies (directly or re-applied), else None."""
    if node.op != "call_module" or not str(node.target).startswith("lowbit_act."):
        return None
    mod = gm.get_submodule(node.target)
    return mod.source if isinstance(mod, Requantize) else mod if isinstance(mod, TensorQuantizer) else None


def _float_layer_call(gm: fx.GraphModule, node: fx.Node, site_nodes: set) -> bool:
    """A call of a Conv / Linear that is not quantized (kept float by a recipe rule)."""
    return node.op == "call_module" and node not in site_nodes and type(gm.get_submodule(node.target)) in QUANT_MODULES


def _is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A batch norm still in the graph (QAT folds it later): the layer's output is what follows it."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and node.target in (torch.batch_norm, F.batch_norm)


def _quantizer_key(uses: list, taken: set, suffix_out: str) -> tuple[str, str]:
    first = next((u for u in uses if u[0] is not None), None)
    if first is None:
        base, qname = suffix_out, f"{suffix_out}.output_quantizer"
    else:
        site, _, arg = first
        base = site.name + ("" if len(site.inputs) == 1 else f"_{site.inputs.index(arg)}")
        qname = f"{site.name}.input_quantizer"
    key = _key(base)
    while key in taken:
        key += "_q"
    taken.add(key)
    return key, qname


def insert_activation_quantizers(gm: fx.GraphModule, plan: GraphPlan, recipe: Recipe) -> dict[str, list[str]]:
    """Insert one shared quantizer per (tensor, spec) consumed by a quantized site, plus (ONNX Runtime) one on
    every quantized op's output and a re-application after data-movement ops (see ``transforms.engine_ops``).

    Returns:
        layer name → names of the quantizers on its inputs (``lowbit_act.<key>``).
    """
    holder = nn.ModuleDict()
    gm.add_module("lowbit_act", holder)
    demands: dict[tuple[fx.Node, QuantSpec], list[Use]] = {}
    requants: list = []
    _input_demands(gm, plan, recipe, demands, requants)
    _output_demands(gm, plan, recipe, demands)
    shared = _shared_pool_requants(gm, plan, recipe)
    layer_inputs: dict[str, list[str]] = {}
    # ONNX export names nodes after their module's last name component; a quantizer key equal to a layer's
    # name (``conv1``) would rename that layer (``conv1_1``) in the INT8 graph only, so its tensor names would
    # differ from the FP32 export's (and the TensorRT calibration cache would name missing tensors).
    taken = {name.rpartition(".")[2] for name, _ in gm.named_modules()}
    placed: dict[tuple[fx.Node, QuantSpec], str] = {}
    for (src, spec), uses in demands.items():
        key, qname = _quantizer_key(uses, taken, f"{src.name}_out")
        quantizer = TensorQuantizer(spec, qname, bounds=producer_bounds(gm, src))
        quantizer.consumers = sorted({site.name for site, _, _ in uses if site is not None})
        holder[key] = quantizer
        placed[(src, spec)] = key
        with gm.graph.inserting_after(src):
            qnode = gm.graph.call_module(f"lowbit_act.{key}", (src,))
        for site, user, _ in uses:
            user.replace_input_with(src, qnode)
            if site is not None and f"lowbit_act.{key}" not in layer_inputs.setdefault(site.name, []):
                layer_inputs[site.name].append(f"lowbit_act.{key}")
    _insert_requants(gm, holder, placed, requants)
    _insert_shared_pools(gm, holder, shared)
    gm.graph.lint()
    gm.recompile()
    return layer_inputs


def _insert_requants(gm: fx.GraphModule, holder: nn.ModuleDict, placed: dict, requants: list) -> None:
    for src, spec, consumer, arg in requants:
        key = placed[(src, spec)]
        rkey = f"{key}_requant_{consumer.name}"
        holder[_key(rkey)] = Requantize(holder[key])
        with gm.graph.inserting_before(consumer):
            rnode = gm.graph.call_module(f"lowbit_act.{_key(rkey)}", (arg,))
        consumer.replace_input_with(arg, rnode)
