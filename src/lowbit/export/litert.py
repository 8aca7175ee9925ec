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
from lowbit.export.litert_rewrite import fold_same_pads
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


def to_tflite(model: nn.Module, example: torch.Tensor, float_model: bool = False, io: str = "float") -> bytes:
    """The ``.tflite`` bytes of ``model`` (a converted lowbit model) for a batch-1 ``example``.

    ``float_model=True``: the same graph with every quantizer disabled (the float reference).
    ``io``: ``float`` (the int8 model quantizes its input and dequantizes its output itself) or ``int8`` (the
    app feeds int8 codes with the input's qparams and reads int8 codes).

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
    with pt2e_form(model):
        data = fold_same_pads(_convert(model, example, _static_quant_config()))[0]
    return float_interface(data) if io == "float" else data


def write_tflite(data: bytes, path: str | Path) -> Path:
    """Write ``data`` atomically to ``path``."""
    from lowbit.export.onnx_static import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, data)
    return path
