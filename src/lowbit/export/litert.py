"""LiteRT (TFLite) export: lowbit's own qparams as a full-integer ``.tflite``, run on the LiteRT interpreter.

The quantized model is traced with every active quantizer in its PT2E form: activations become
``quantized_decomposed.quantize_per_tensor → dequantize_per_tensor`` (int8), weights
``quantize_per_channel → dequantize_per_channel`` of the float weight (symmetric, zero-point 0), biases the float
value already rounded to the ``s_in · s_w`` grid. ``litert_torch.convert`` in static Q/DQ mode turns that graph
into int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / ADD / MEAN ... whose scales and zero-points are exactly
lowbit's float32 values (the PT2E quantizer passed in ``QuantConfig`` only selects that mode; it never runs).

``litert_torch`` and ``ai_edge_litert`` are optional (``pip install 'lowbit[litert]'``); without them every entry
point raises :class:`LiteRTUnavailable` with that one line.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import warnings
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.core import PerTensor
from lowbit.export.litert_flatbuffer import float_interface
from lowbit.export.litert_rewrite import fold_same_pads, int8_weights_behind_dequantize
from lowbit.nn import QuantLayerMixin, TensorQuantizer, instance_overrides, quantizers_disabled
from lowbit.nn.modules import INT32_MIN, INT32_MAX
from lowbit.transforms.graph import is_zero_pad

log = logging.getLogger(__name__)

INSTALL_HINT = "LiteRT export needs the optional packages: pip install 'lowbit[litert]'"


class LiteRTUnavailable(RuntimeError):
    """``litert_torch`` or ``ai_edge_litert`` is not importable."""


class LiteRTConversionError(RuntimeError):
    """The LiteRT converter rejected the model (the message names the op)."""


def require_litert() -> None:
    """Raise :class:`LiteRTUnavailable` (one line, how to install) when the LiteRT packages are missing."""
    for noisy in ("torchao", "litert_torch", "absl"):  # optional CUDA kernels and triton reported at WARNING
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for name in ("ai_edge_litert.interpreter", "litert_torch"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise LiteRTUnavailable(f"{INSTALL_HINT} ({exc.name or name} is not installed)") from None


def _qd():
    return torch.ops.quantized_decomposed


def _pt2e_activation(q: TensorQuantizer):
    """A forward for ``q`` that emits int8 per-tensor quantize → dequantize (scalars baked in)."""
    scale, zp = float(q.scale.reshape(())), int(q.zero_point.reshape(()))
    qmin, qmax = q.spec.qmin, q.spec.qmax

    def forward(x: torch.Tensor) -> torch.Tensor:
        codes = _qd().quantize_per_tensor(x, scale, zp, qmin, qmax, torch.int8)
        return _qd().dequantize_per_tensor(codes, scale, zp, qmin, qmax, torch.int8)

    return forward


def _pt2e_weight(q: TensorQuantizer, ndim: int):
    """A forward for a weight quantizer: per-channel (or per-tensor) quantize → dequantize of the float weight."""
    qmin, qmax = q.spec.qmin, q.spec.qmax
    if isinstance(q.spec.granularity, PerTensor):
        return _pt2e_activation(q)
    axis = q.spec.granularity.axis % ndim
    scales = q.scale.detach().reshape(-1).to(torch.float32).clone()
    zps = q.zero_point.detach().reshape(-1).to(torch.int64).clone()

    def forward(w: torch.Tensor) -> torch.Tensor:
        codes = _qd().quantize_per_channel(w, scales, zps, axis, qmin, qmax, torch.int8)
        return _qd().dequantize_per_channel(codes, scales, zps, axis, qmin, qmax, torch.int8)

    return forward


def _rounded_bias(layer: QuantLayerMixin) -> torch.Tensor | None:
    """The bias on its int32 grid ``s_in · s_w`` (what the converter stores as int32), as a float constant."""
    grid = layer.bias_qparams()
    if grid is None:
        return None if layer.bias is None else layer.bias.detach().clone()
    with torch.no_grad():
        return (torch.clamp(torch.round(layer.bias / grid[0]), INT32_MIN, INT32_MAX) * grid[0]).detach().clone()


@contextlib.contextmanager
def pt2e_form(model: nn.Module):
    """Within the block every active quantizer of ``model`` traces as PT2E quantize / dequantize ops and every
    quantized layer as a float op on its quantize → dequantize weight (the engine emulation is switched off)."""
    overrides: list = []
    weights = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QuantLayerMixin)}
    for mod in model.modules():
        if isinstance(mod, QuantLayerMixin):
            overrides += _layer_overrides(mod)
        elif isinstance(mod, TensorQuantizer) and mod.is_active and id(mod) not in weights:
            _check_activation(mod)
            overrides.append((mod, "forward", _pt2e_activation(mod)))
    with instance_overrides(overrides):
        yield model


def _check_activation(q: TensorQuantizer) -> None:
    spec = q.spec
    if not (spec.signed and spec.bits == 8 and isinstance(spec.granularity, PerTensor)):
        raise ValueError(f"quantizer {q.qname}: LiteRT takes int8 per-tensor activations (recipe target litert)")


def _layer_overrides(layer: QuantLayerMixin) -> list[tuple[nn.Module, str, object]]:
    wq = layer.weight_quantizer
    overrides = [(layer, "_engine_ready", lambda: False), (layer, "_integer_inputs_ready", lambda: False)]
    if not wq.is_active:
        return overrides
    if wq.spec.signed is False or int(wq.zero_point.abs().max()) != 0:
        raise ValueError(f"layer {layer.layer_name}: LiteRT needs signed weights with zero-point 0")
    bias = _rounded_bias(layer)
    return overrides + [(wq, "forward", _pt2e_weight(wq, layer.weight.ndim)), (layer, "quantized_bias", lambda: bias)]


def _zero_pad_amounts(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` of a 2-D zero padding node (``nn.ZeroPad2d`` / ``F.pad``), else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ZeroPad2d):
        pads = gm.get_submodule(node.target).padding
    elif node.op == "call_function" and node.target is F.pad and is_zero_pad(node):
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    else:
        return None
    pads = tuple(int(p) for p in pads)
    return pads if len(pads) == 4 and min(pads) >= 0 else None


def fold_zero_pads(gm: fx.GraphModule) -> int:
    """Move a symmetric zero padding in front of a Conv2d into the conv (in place; returns the count).

    The LiteRT converter folds ``pad → conv`` into the conv only in float: between quantize / dequantize ops the
    pad stays an NCHW PAD with a TRANSPOSE on each side. As the conv's own padding it becomes a SAME conv (or an
    NHWC PAD that XNNPACK fuses). Real 0 is code ``z`` exactly, so this is bit-exact. Asymmetric (TensorFlow
    SAME, stride 2) paddings have no conv form in PyTorch and are left alone.
    """
    folded = 0
    for node in list(gm.graph.nodes):
        pads = _zero_pad_amounts(gm, node)
        if pads is None or len(node.users) != 1 or pads[0] != pads[1] or pads[2] != pads[3]:
            continue
        user = next(iter(node.users))
        conv = gm.get_submodule(user.target) if user.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or tuple(conv.padding) != (0, 0) or user.args[0] is not node \
                or conv.padding_mode != "zeros":
            continue
        conv.padding = (pads[2], pads[0])
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        folded += 1
    gm.recompile()
    return folded


def head_quantizer(model: nn.Module) -> tuple[str, TensorQuantizer, QuantLayerMixin] | None:
    """``(name, quantizer, layer)`` when the model's single output is a quantized ``nn.Linear``'s output run
    through an active activation quantizer (a classifier's int8 logits), else None. Conv outputs (dense
    prediction heads) are left int8: a float conv there would cost real time."""
    if not isinstance(model, fx.GraphModule):
        return None
    out = next(n for n in model.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or out.op != "call_module" or not out.args:
        return None
    quantizer, src = model.get_submodule(out.target), out.args[0]
    if not isinstance(quantizer, TensorQuantizer) or not quantizer.is_active or not isinstance(src, fx.Node) \
            or src.op != "call_module" or not isinstance(model.get_submodule(src.target), QuantLayerMixin) \
            or not isinstance(model.get_submodule(src.target), nn.Linear):
        return None
    return out.target, quantizer, model.get_submodule(src.target)


@contextlib.contextmanager
def float_head(model: nn.Module):
    """Within the block the model's output layer (see :func:`head_quantizer`) returns float: its int32
    accumulator dequantized, ``y = s_in · s_w · Σ (q_x - z_x) q_w + b`` (what the ONNX Runtime target does),
    instead of int8 codes. Yields the head's ``(name, quantizer, layer)`` or None (nothing changed)."""
    head = head_quantizer(model)
    with instance_overrides([(head[1], "enabled", False)] if head else []):
        yield head


def _static_quant_config():
    from litert_torch.quantize import pt2e_quantizer, quant_config

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    return quant_config.QuantConfig(pt2e_quantizer=quantizer)


def _convert(module: nn.Module, example: torch.Tensor, quant_config=None) -> bytes:
    import litert_torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            edge = litert_torch.convert(module, (example,), quant_config=quant_config)
        except Exception as exc:  # noqa: BLE001 — the converter raises many types; name the op in one line
            raise LiteRTConversionError(conversion_error_line(exc)) from exc
    return edge.model_content()


def conversion_error_line(exc: BaseException) -> str:
    """One line naming what the LiteRT converter refused (the first line mentioning an op, else the first)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    for ln in lines:
        low = ln.lower()
        if "op" in low and ("not supported" in low or "failed to legalize" in low or "unsupported" in low):
            return f"LiteRT converter rejected the model: {ln[:300]}"
    return f"LiteRT converter rejected the model: {type(exc).__name__}: {lines[0][:300]}"


def to_tflite(model: nn.Module, example: torch.Tensor, float_model: bool = False, io: str = "float",
              head: str | None = None) -> bytes:
    """The ``.tflite`` bytes of ``model`` (a converted lowbit model) for a batch-1 ``example``.

    ``float_model=True``: the same graph with every quantizer disabled (the float reference).
    ``io``: ``float`` (the int8 model quantizes its input and dequantizes its output itself) or ``int8`` (the
    app feeds int8 codes with the input's qparams and reads int8 codes).

    ``head``: ``float`` (the default with ``io="float"``): the output layer (a classifier's FULLY_CONNECTED)
    reads the dequantized int8 activations and returns float logits, its weights stored as int8 codes behind a
    DEQUANTIZE (:func:`float_head`, :func:`lowbit.export.litert_rewrite.int8_weights_behind_dequantize`);
    ``int8`` (the default and the only choice with ``io="int8"``): int8 logits, an all-int8 file.

    Both files go through :func:`lowbit.export.litert_rewrite.fold_same_pads`: the asymmetric TensorFlow SAME
    paddings (stride 2) the converter leaves as ``TRANSPOSE → PAD → TRANSPOSE`` become SAME convolutions.
    """
    if io not in ("float", "int8"):
        raise ValueError(f"io must be 'float' or 'int8', got {io!r}")
    require_litert()
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        log.info("LiteRT export: %d zero paddings folded into their convolutions", fold_zero_pads(model))
    example = example[:1]
    if float_model:
        with quantizers_disabled(model), pt2e_form(model):
            return fold_same_pads(_convert(model, example))[0]
    head = _check_head(io, head)
    with (float_head(model) if head == "float" else contextlib.nullcontext()) as floated, pt2e_form(model):
        codes = _dequantized_weight(floated[2]) if floated else None
        data = fold_same_pads(_convert(model, example, _static_quant_config()))[0]
    if codes is not None:
        data = int8_weights_behind_dequantize(data, [codes])
    return float_interface(data) if io == "float" else data


def _check_head(io: str, head: str | None) -> str:
    """The head to export: ``float`` by default with float io, ``int8`` with int8 io (the only choice there)."""
    head = head or ("float" if io == "float" else "int8")
    if head not in ("float", "int8") or (io == "int8" and head == "float"):
        raise ValueError(f"head must be 'float' or 'int8' ('int8' with io='int8'), got {head!r}")
    return head


def _dequantized_weight(layer: QuantLayerMixin) -> tuple:
    """Set a float layer's weight (in a copy of the model) to its dequantized int8 value, ``float32(q) · s``:
    the converter drops the quantize / dequantize of a float op's weight and would keep the unquantized one.
    Returns the ``(codes, scales, axis)`` of :func:`_weight_codes`."""
    codes, scales, axis = _weight_codes(layer)
    shape = [-1 if d == axis else 1 for d in range(codes.ndim)] if scales.size > 1 else [1]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(codes).float() * torch.from_numpy(scales).reshape(shape))
    return codes, scales, axis


def _weight_codes(layer: QuantLayerMixin) -> tuple:
    """``(codes int8, scales float32, axis)`` of a layer's weight: the codes of the weight quantizer's own
    output (its PT2E quantize → dequantize inside :func:`pt2e_form`), ``q = round(w_dq / s)``, exact."""
    q = layer.weight_quantizer
    axis = q.spec.granularity.axis % layer.weight.ndim if not isinstance(q.spec.granularity, PerTensor) else 0
    scale = q.scale.detach().reshape(-1).to(torch.float32)
    shape = [-1 if d == axis else 1 for d in range(layer.weight.ndim)] if scale.numel() > 1 else [1]
    with torch.no_grad():
        codes = torch.clamp(torch.round(q(layer.weight) / scale.reshape(shape)), q.spec.qmin, q.spec.qmax)
    return codes.to(torch.int8).numpy(), scale.numpy(), axis


def write_tflite(data: bytes, path: str | Path) -> Path:
    """Write ``data`` atomically to ``path``."""
    from lowbit.export.onnx_static import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, data)
    return path
