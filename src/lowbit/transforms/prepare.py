"""``prepare_`` and ``convert_``: put quantizers into a float model, then freeze them.

prepare_: eval-mode model → graph captured (``torch.export``, else ``torch.fx``; see ``transforms.capture``)
→ BatchNorm folded → Conv/Linear swapped for quantized twins → activation quantizers on every tensor an
int8 op consumes. A model neither path can capture falls back to module swap (each Conv/Linear quantizes
its own input) with a warning that names the functional ops left in float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.device import model_device, to_device
from lowbit.core import PerChannel, QuantSpec
from lowbit.nn import QUANT_MODULES, QuantLayerMixin, QuantState, TensorQuantizer, from_float
from lowbit.transforms.capture import capture_model
from lowbit.transforms.engine_ops import (decompose_attention, decompose_gated, explicit_same_padding,
                                          global_pools_for_whole_map_windows)
from lowbit.transforms.bn_fold import fold_bn_graph, fold_bn_sequential
from lowbit.transforms.graph import find_sites, link_engine_kernels
from lowbit.transforms.placement import insert_activation_quantizers
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class PrepareInfo:
    """What ``prepare_`` did, kept on the model as ``model.lowbit_info``."""

    recipe: Recipe
    traced: bool
    folded_bn: list[str] = field(default_factory=list)
    float_layers: list[tuple[str, str]] = field(default_factory=list)
    layer_inputs: dict[str, list[str]] = field(default_factory=dict)
    layer_kinds: dict[str, str] = field(default_factory=dict)
    capture: str = ""
    capture_path: str = ""


def _weight_spec(spec: QuantSpec | None, mod: nn.Module) -> QuantSpec | None:
    axis = getattr(QUANT_MODULES.get(type(mod)), "weight_axis", 0)
    if spec is not None and isinstance(spec.granularity, PerChannel) and spec.granularity.axis == 0 and axis != 0:
        return replace(spec, granularity=PerChannel(axis))
    return spec


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _prepare_traced(gm: fx.GraphModule, recipe: Recipe) -> PrepareInfo:
    folded = fold_bn_graph(gm)
    info = insert_quantizers(gm, recipe)
    info.folded_bn = folded
    if recipe.target in ("onnxruntime", "litert"):
        links = link_engine_kernels(gm, recipe.target)
        log.info("linked %d layers to exact engine-kernel emulation", links)
    return info


def insert_quantizers(gm: fx.GraphModule, recipe: Recipe) -> PrepareInfo:
    """Shared activation quantizers on every consumed tensor, Conv/Linear swapped for quantized twins (in place;
    BatchNorm is not touched: PTQ folds it first, QAT simulates the fold)."""
    info = PrepareInfo(recipe=recipe, traced=True)
    explicit_same_padding(gm)
    global_pools_for_whole_map_windows(gm)
    if recipe.target == "onnxruntime":
        decompose_gated(gm)  # SiLU, Hardswish as x · gate(x): QLinearMul (and QLinearSigmoid) instead of float
        decompose_attention(gm)  # q kᵀ and p v as QLinearMatMul
    plan = find_sites(gm, recipe)
    info.float_layers = plan.float_layers
    info.layer_inputs = insert_activation_quantizers(gm, plan, recipe)
    for site in plan.sites:
        info.layer_kinds[site.name] = site.kind
        if site.node.op != "call_module":
            continue
        mod = gm.get_submodule(site.name)
        if type(mod) not in QUANT_MODULES:
            continue  # a pool or activation module (input quantizers only), or already swapped at an earlier call
        qmod = from_float(mod, site.name, _weight_spec(site.weight, mod), None)
        ups = info.layer_inputs.get(site.name, [])
        qmod.set_upstream_input_quantizer(gm.get_submodule(ups[0]) if ups else None)
        _set_module(gm, site.name, qmod)
    gm.recompile()
    return info


class _OpRecorder(TorchFunctionMode):
    """Records the functional ops a forward pass calls (to name what module swap leaves in float)."""

    WATCH = {"add", "__add__", "__iadd__", "cat", "concat", "matmul", "__matmul__", "bmm", "mul", "__mul__"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.WATCH:
            self.seen[name.strip("_")] = self.seen.get(name.strip("_"), 0) + 1
        return func(*args, **(kwargs or {}))


def _prepare_swapped(model: nn.Module, recipe: Recipe, reason: str, example_input) -> PrepareInfo:
    info = PrepareInfo(recipe=recipe, traced=False)
    info.folded_bn = fold_bn_sequential(model)
    if example_input is not None:
        recorder = _OpRecorder()
        with torch.no_grad(), recorder:
            model(example_input)
        for op, count in sorted(recorder.seen.items()):
            info.float_layers.append((f"{op} (x{count})", f"functional op not quantized: graph capture failed ({reason})"))
    for name, mod in list(model.named_modules()):
        if type(mod) not in QUANT_MODULES:
            continue
        weight, inp = recipe.resolve(name, type(mod).__name__)
        if weight is None and inp is None:
            info.float_layers.append((name, "kept in float by a recipe rule"))
            continue
        _set_module(model, name, from_float(mod, name, _weight_spec(weight, mod), inp))
        info.layer_kinds[name] = type(mod).__name__
        info.layer_inputs[name] = [f"{name}.input_quantizer"]
    ops = ", ".join(n for n, _ in info.float_layers if "functional" in _) or "unknown (pass example_input)"
    log.warning("graph capture failed (%s); fell back to module swap, functional ops left in float: %s", reason, ops)
    return info


def prepare_(model: nn.Module, recipe: Recipe, example_input: torch.Tensor | None = None,
             capture: str = "auto") -> nn.Module:
    """Fold BatchNorm and insert quantizers as ``recipe`` says.

    The model's own modules are modified (BN folded, Conv/Linear swapped); use the returned module, which
    is a ``torch.fx.GraphModule`` when graph capture succeeded. ``copy.deepcopy`` the model first to keep
    the float original.

    Args:
        capture: ``auto`` (``torch.export``, else ``torch.fx``, else module swap), ``export``, ``fx`` or
            ``swap`` (see ``transforms.capture.capture_model``).

    Returns:
        the prepared model, with ``model.lowbit_info`` (:class:`PrepareInfo`), every parameter, buffer and
        quantizer on the device of ``model`` (``example_input`` is moved there).
    """
    if model.training:
        raise ValueError("prepare_ needs an eval-mode model (BatchNorm folding uses running statistics): call model.eval()")
    recipe = recipe.for_machine()
    device = model_device(model)
    example_input = to_device(example_input, device)
    cap = capture_model(model, example_input, capture)
    log.info("%s", cap.describe())
    if cap.graph_module is None:
        info = _prepare_swapped(model, recipe, "; ".join(cap.fallback_reasons), example_input)
        prepared = model
    else:
        prepared = cap.graph_module
        info = _prepare_traced(prepared, recipe)
    info.capture = cap.describe()
    info.capture_path = cap.path
    prepared.lowbit_info = info
    prepared.to(device)  # quantizers are created on the CPU; they live with the model
    prepared.eval()
    return prepared


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """Every quantizer in ``model`` with its module path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    """Every quantized Conv/Linear layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def start_calibration_(model: nn.Module) -> None:
    """Put every quantizer in the calibrating state; weight quantizers observe their weight at once."""
    for _, q in quantizers(model):
        q.reset()
        q.start_calibration()
    for _, layer in quant_layers(model):
        if layer.weight_quantizer.state is QuantState.CALIBRATING:
            layer.weight_quantizer.observe(layer.weight)


ConvertHook = Callable[[nn.Module], Callable[[], None] | None]
_CONVERT_HOOKS: list[ConvertHook] = []


def register_convert_hook(hook: ConvertHook) -> None:
    """Run ``hook(model)`` at the start of every :func:`convert_`; what it returns (if anything) runs after the
    quantizers are frozen. ``lowbit.qat`` registers the hook that finishes QAT models, so one ``convert_``
    serves both."""
    if hook not in _CONVERT_HOOKS:
        _CONVERT_HOOKS.append(hook)


def convert_(model: nn.Module) -> nn.Module:
    """Freeze every calibrating quantizer: qparams are computed from its observer and stored.

    A QAT model (``lowbit.qat.prepare_qat_``, also inside ``DistributedDataParallel``) is finished first:
    BatchNorm folded for real, learnt qparams frozen, eval mode, engine kernels linked. Returns the converted
    model (the wrapped module for DDP).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    after = [done for done in (hook(model) for hook in _CONVERT_HOOKS) if done is not None]
    pending = [n for n, q in quantizers(model) if q.spec is not None and q.state is QuantState.INITIAL]
    if pending:
        raise RuntimeError(f"quantizer {pending[0]} was never calibrated: run lowbit.calibrate before convert_")
    for _, q in quantizers(model):
        if q.state is QuantState.CALIBRATING:
            q.freeze()
    for name, layer in quant_layers(model):
        raised = layer.fit_bias_range_()
        if raised:
            log.info("%s: raised %d weight scales so int32 bias codes fit", name, raised)
    for done in after:
        done()
    return model
