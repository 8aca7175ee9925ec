"""Recurrent layers under a static (calibrated activation) recipe.

ONNX Runtime has no integer kernel for a ``QuantizeLinear → DequantizeLinear → LSTM / GRU / RNN`` group: it
would run such a layer in float whatever Q/DQ nodes surround it. Its integer LSTM path is dynamic
quantization (``DynamicQuantizeLSTM``, what ``--mode dynamic`` exports). So a static job refuses a model with
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` layers, naming the first one and pointing to ``--mode dynamic``, unless a
recipe rule keeps that layer in float on purpose; such layers are then listed as float layers.
"""

from __future__ import annotations

from torch import nn

from lowbit.transforms.recipe import Recipe

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
KEPT_FLOAT = "kept in float by a recipe rule (ONNX Runtime has no static INT8 kernel for {type}; --mode dynamic has one)"


def recurrent_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(qualified name, class name)`` of every LSTM / GRU / RNN layer of ``model``, in module order."""
    return [(name, type(m).__name__) for name, m in model.named_modules() if isinstance(m, RECURRENT)]


def check_recurrent(model: nn.Module, recipe: Recipe) -> list[tuple[str, str]]:
    """Refuse recurrent layers in a static job unless a recipe rule keeps them in float.

    Returns:
        ``(layer, reason)`` for each recurrent layer kept in float by a rule (for the report's float layers).

    Raises:
        ValueError: a recurrent layer would be quantized statically (one line naming it and ``--mode dynamic``).
    """
    kept = []
    for name, type_name in recurrent_layers(model):
        weight, act = recipe.resolve(name, type_name)
        if weight is not None or act is not None:
            raise ValueError(
                f"layer {name!r} is an nn.{type_name}: ONNX Runtime has no static INT8 kernel for it; "
                f"use --mode dynamic (or keep it in float with a recipe rule 'pattern: {name}, float: true')")
        kept.append((name, KEPT_FLOAT.format(type=type_name)))
    return kept
