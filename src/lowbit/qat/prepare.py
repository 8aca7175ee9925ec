"""``prepare_qat_`` and ``convert_``: a float model into a trainable fake-quantized one, and back to the
same kind of model PTQ produces.

prepare_qat_: graph capture (torch.fx) → the PTQ passes (activation quantizers on every tensor an int8 op
consumes, Conv/Linear swapped for quantized twins) *without* folding BatchNorm → each Conv/Linear + BN
pair becomes one QAT layer that simulates the fold → every quantizer becomes a ``LearnableQuantizer``.
``from_ptq=True`` then calibrates exactly as PTQ does (same observers, same folded weights), so training
starts from the PTQ model. A model that cannot be traced falls back to ``lowbit.prepare_`` (BN folded for
real, module swap) before the same upgrade.

convert_: BN folded for real, learnt qparams frozen, classes swapped back (``QuantConv2d``, ``TensorQuantizer``),
engine kernels linked; ``export_onnx`` / ``check_onnx_parity`` / the report then work as after PTQ.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

from lowbit.device import model_device, to_device
from lowbit.nn import QuantLayerMixin, QuantState
from lowbit.data import Data, iter_batches, run_batch
from lowbit.qat.config import QATConfig
from lowbit.qat.layers import BN_SIMULATED, QATLayerMixin, to_qat_
from lowbit.qat.quantizer import LearnableQuantizer
from lowbit.transforms.bn_fold import BATCHNORMS, fold_into
from lowbit.transforms.graph import link_engine_kernels
from lowbit.transforms.prepare import (
    PrepareInfo,
    convert_ as ptq_convert_,
    insert_quantizers,
    prepare_,
    quant_layers,
    quantizers,
    register_convert_hook,
)
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)


def _bn_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The BatchNorm node that is the only user of ``node``, if it has running statistics."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_module" or user.args[:1] != (node,):
        return None
    bn = gm.get_submodule(user.target)
    return user if isinstance(bn, BATCHNORMS) and bn.track_running_stats and bn.running_mean is not None else None


def _fuse_bn(gm: fx.GraphModule, config: QATConfig) -> list[str]:
    """Move every BN that follows a quantized layer into it (simulated in QAT layers; folded for real
    after a ConvTranspose). Returns the BN names taken."""
    taken = []
    for node in list(gm.graph.nodes):
        if str(node.target) in taken or node.op != "call_module":
            continue
        if not isinstance(gm.get_submodule(node.target), QuantLayerMixin):
            continue
        bn_node = _bn_after(gm, node)
        if bn_node is None:
            continue
        layer, bn = gm.get_submodule(node.target), gm.get_submodule(bn_node.target)
        if type(layer) in BN_SIMULATED:
            to_qat_(layer, config, bn)
        else:
            with torch.no_grad():
                fold_into(layer, bn.eval())
            log.info("%s: BatchNorm %s folded before training (not simulated for %s)", node.target,
                     bn_node.target, type(layer).__name__)
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(str(bn_node.target))  # it lives on inside the layer (or was folded)
        taken.append(str(bn_node.target))
    gm.graph.lint()
    gm.recompile()
    return taken


def _prepare_graph(gm: fx.GraphModule, recipe: Recipe, config: QATConfig) -> PrepareInfo:
    """``transforms.prepare.insert_quantizers``, then BatchNorm fused for simulated folding."""
    info = insert_quantizers(gm, recipe)
    info.folded_bn = _fuse_bn(gm, config)
    return info


def _upgrade(model: nn.Module, config: QATConfig, example_input: torch.Tensor | None) -> None:
    weight_of = {}
    for _, layer in quant_layers(model):
        if not isinstance(layer, QATLayerMixin):
            to_qat_(layer, config)
        weight_of[id(layer.weight_quantizer)] = layer
    learnable = []
    for _, q in quantizers(model):
        if q.spec is None:
            continue
        layer = weight_of.get(id(q))
        LearnableQuantizer.upgrade_(q, "weight" if layer is not None else "activation", config)
        if layer is not None:
            q.init_parameters_(layer.weight.shape)
        else:
            learnable.append(q)
    per_tensor = [q for q in learnable if q.spec.granularity.kind == "per_tensor"]
    for q in per_tensor:
        q.init_parameters_(())
    others = [q for q in learnable if q.spec.granularity.kind != "per_tensor"]
    if others:
        _init_from_shapes(model, others, example_input)


def _init_from_shapes(model: nn.Module, qs: list[LearnableQuantizer], example_input: torch.Tensor | None) -> None:
    """Per-channel activation ranges need the tensor's shape: one float forward pass of ``example_input``."""
    if example_input is None:
        raise ValueError(f"quantizer {qs[0].qname} is per-channel: prepare_qat_ needs example_input to size it")
    shapes = {}

    def record(module, args) -> None:
        shapes.setdefault(id(module), args[0].shape)

    hooks = [q.register_forward_pre_hook(record) for q in qs]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    for q in qs:
        if id(q) not in shapes:
            raise ValueError(f"quantizer {q.qname} was not reached by example_input")
        q.init_parameters_(shapes[id(q)])


def calibrate_qat_(model: nn.Module, data: Data, batch_size: int = 32) -> nn.Module:
    """PTQ calibration of a QAT model, then every range starts learning from its PTQ value.

    The same observers as ``lowbit.calibrate`` (the recipe's calibrators) on the same float activations:
    BatchNorm runs on its running statistics, folded into the weight the weight quantizers observe, so the
    qparams equal PTQ's ``prepare_`` → ``calibrate`` → ``convert_`` bit for bit (weights: unless
    ``QATConfig.weight_init="mse"`` re-fits them). ``data`` may be a
    ``forward_loop(model)`` (e.g. ``lowbit.ptq.distributed.sharded_forward_loop`` for several processes).
    """
    qs = [q for _, q in quantizers(model) if isinstance(q, LearnableQuantizer)]
    for q in qs:
        q.reset()
        q.start_calibration()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _, layer in quant_layers(model):
            wq = layer.weight_quantizer
            if wq.state is QuantState.CALIBRATING:
                wq.observe(layer.folded_weight() if isinstance(layer, QATLayerMixin) else layer.weight)
        if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
            data(model)
        else:
            n = 0
            for batch in iter_batches(data, batch_size):
                run_batch(model, batch)
                n += 1
            if n == 0:
                raise ValueError("calibration data is empty: no batch was seen")
    for q in qs:
        q.freeze()
    if any(q.config.weight_init == "mse" for q in qs):
        with torch.no_grad():
            for _, layer in quant_layers(model):
                wq = layer.weight_quantizer
                if isinstance(wq, LearnableQuantizer) and wq.config.weight_init == "mse":
                    wq.init_from_tensor_(layer.folded_weight())
    for q in qs:
        q.adopt_qparams_()
    model.train(was_training)
    return model


def prepare_qat_(
    model: nn.Module,
    recipe: Recipe,
    example_input: torch.Tensor | None = None,
    config: QATConfig = QATConfig(),
    from_ptq: bool = False,
    calib_data: Data | None = None,
) -> nn.Module:
    """Insert learnable fake quantizers (and simulated BN folding) as ``recipe`` says; returns the model in
    training mode, a ``torch.fx.GraphModule`` when graph capture succeeded.

    The model's own parameters are shared with the result and are trained in place: ``copy.deepcopy`` the
    float model first to keep it (e.g. as the distillation teacher).

    Args:
        recipe: what to quantize and how (bits, symmetry, granularity, calibrators used by ``from_ptq``).
        example_input: one batch; needed for per-channel activation specs and for the fallback's report.
        config: observer / learning / BatchNorm schedule (:class:`QATConfig`).
        from_ptq: calibrate on ``calib_data`` as PTQ does and start learning from those qparams at step 0.
        calib_data: batches, a Tensor of inputs or a ``forward_loop(model)`` (required with ``from_ptq``).
    """
    if from_ptq and calib_data is None:
        raise ValueError("prepare_qat_(from_ptq=True) needs calib_data")
    recipe = recipe.for_machine()
    device = model_device(model)
    example_input = to_device(example_input, device)
    if recipe.passes:
        log.warning("prepare_qat_ does not run post-training passes; recipe passes %s are ignored", ", ".join(recipe.passes))
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 — any tracing failure means: fall back to module swap
        log.warning("graph capture failed (%s): BatchNorm is folded before training instead of simulated",
                    type(exc).__name__)
        prepared = prepare_(model.eval(), recipe, example_input, capture="fx")  # QAT simulates BN on fx graphs only
    else:
        info = _prepare_graph(gm, recipe, config)
        gm.lowbit_info = info
        prepared = gm
    prepared.to(device)  # quantizers are created on the CPU; ranges and step counters follow them
    _upgrade(prepared, config, example_input)
    if from_ptq:
        calibrate_qat_(prepared, calib_data)
    return prepared.train()


def _finish_qat(model: nn.Module):
    """The convert hook of QAT models: fold BatchNorm for real and turn learnt ranges into frozen
    ``TensorQuantizer`` s (eval mode); once frozen, link the engine-kernel emulation. No-op on other models."""
    layers = [layer for _, layer in quant_layers(model) if isinstance(layer, QATLayerMixin)]
    if not layers and not any(isinstance(q, LearnableQuantizer) for _, q in quantizers(model)):
        return None
    model.eval()
    for layer in layers:
        layer.fold_()
    for _, q in quantizers(model):
        if isinstance(q, LearnableQuantizer):
            q.to_tensor_quantizer_()

    def link() -> None:
        info = getattr(model, "lowbit_info", None)
        if isinstance(model, fx.GraphModule) and info is not None and info.traced and info.recipe.target == "onnxruntime":
            log.info("linked %d layers to exact engine-kernel emulation", link_engine_kernels(model))
    return link


register_convert_hook(_finish_qat)


def convert_(model: nn.Module) -> nn.Module:
    """Finish QAT: fold BatchNorm for real, freeze learnt qparams, and return the PTQ kind of model
    (``QuantConv2d`` … with frozen ``TensorQuantizer``), in eval mode, ready for ``export_onnx``.

    The same as ``lowbit.convert_`` (which finishes QAT models too); kept so ``qat.convert_`` still reads as
    the end of a QAT script.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model.eval()
    return ptq_convert_(model)
