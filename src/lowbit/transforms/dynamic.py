"""``quantize_dynamic_``: swap Linear / LSTM / GRU layers for dynamically quantized twins.

Weights are quantized once, here (the recipe's weight spec: symmetric, per output channel by default);
activations are quantized at run time to uint8 (ONNX ``DynamicQuantizeLinear``), per tensor, or per token
when the recipe's input granularity is ``per_channel`` (axis 0 of the ``[tokens, features]`` view). No
calibration data is needed. Convolutions are refused: a per-tensor scale recomputed for every feature map
is known to destroy convolutional accuracy; keep them in float with a rule or use static PTQ.

Embedding tables (``nn.Embedding``) become int8 per row (``QuantEmbedding``: gather int8 rows, then scale);
they are matched by rules as ``type:Embedding`` and use 8 bits even where Linear weights use 7 (a gather
has no u8×s8 product to saturate).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from lowbit.core import PerChannel, PerTensor, QuantSpec
from lowbit.nn.dynamic import DYNAMIC_MODULES, DynamicMixin, dynamic_from_float
from lowbit.nn.embedding import QuantEmbedding
from lowbit.transforms.prepare import PrepareInfo
from lowbit.transforms.recipe import PRESETS, Recipe

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DYNAMIC_ACT = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax")


def dynamic_recipe(per_token: bool = True, weight_bits: int | None = None) -> Recipe:
    """The dynamic-quantization recipe: the ``int8`` preset's weights (int8 symmetric per channel, 7-bit on
    CPUs without VNNI) and uint8 run-time activations, per token (default) or per tensor.

    Per token is the default: on MiniLM, per-tensor run-time scales follow the largest outlier of the whole
    batch (mean embedding cosine 0.992 vs 0.996 per token) at about the same ONNX Runtime speed.
    """
    base = PRESETS["int8"]
    weight = base.default_weight if weight_bits is None else replace(base.default_weight, bits=weight_bits)
    act = replace(DYNAMIC_ACT, granularity=PerChannel(0) if per_token else PerTensor())
    return Recipe(default_weight=weight, default_input=act, rules=base.rules, target=base.target,
                  machine_weight_bits=base.machine_weight_bits and weight_bits is None)


def _per_token(spec: QuantSpec, name: str) -> bool:
    if spec.bits != 8:
        raise ValueError(f"layer {name}: dynamic activations are 8-bit (ONNX DynamicQuantizeLinear), recipe asks {spec.bits}")
    g = spec.granularity
    if isinstance(g, PerTensor):
        return False
    if isinstance(g, PerChannel) and g.axis == 0:
        return True
    raise ValueError(f"layer {name}: dynamic activations are per_tensor or per-token (per_channel axis 0), got {g!r}")


def _set_module(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_dynamic_(model: nn.Module, recipe: Recipe | None = None) -> nn.Module:
    """Quantize ``model`` in place for dynamic inference and return it (with ``model.lowbit_info``).

    Args:
        model: an eval-mode float model.
        recipe: weight spec, activation granularity and per-layer rules (``dynamic_recipe()`` by default);
            a rule that keeps a layer in float leaves it untouched.

    Raises:
        ValueError: for a convolution the recipe would quantize (named), or unsupported specs.
    """
    if model.training:
        raise ValueError("quantize_dynamic_ needs an eval-mode model: call model.eval()")
    recipe = (recipe or dynamic_recipe()).for_machine()
    info = PrepareInfo(recipe=recipe, traced=False)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, DynamicMixin):
            raise ValueError(f"layer {name} is already dynamically quantized")
        kind = type(mod).__name__
        if isinstance(mod, CONV_TYPES):
            weight, inp = recipe.resolve(name, kind)
            if weight is not None or inp is not None:
                raise ValueError(f"layer {name}: dynamic quantization of {kind} is refused (run-time activation "
                                 "scales destroy convolutional accuracy); keep it float with a rule or use static PTQ")
            info.float_layers.append((name, "kept in float by a recipe rule"))
            continue
        if type(mod) is nn.Embedding:
            _quantize_embedding(model, name, mod, recipe, info)
            continue
        if type(mod) not in DYNAMIC_MODULES:
            continue
        weight, inp = recipe.resolve(name, kind)
        if weight is None or inp is None:
            info.float_layers.append((name, "kept in float by a recipe rule"))
            continue
        _set_module(model, name, dynamic_from_float(mod, name, weight, _per_token(inp, name)))
        info.layer_kinds[name] = kind
    if not info.layer_kinds:
        log.warning("quantize_dynamic_: no Linear / LSTM / GRU layer was quantized")
    model.lowbit_info = info
    return model


def _quantize_embedding(model: nn.Module, name: str, mod: nn.Embedding, recipe: Recipe, info: PrepareInfo) -> None:
    weight, _ = recipe.resolve(name, "Embedding")
    if weight is None:
        info.float_layers.append((name, "kept in float by a recipe rule"))
        return
    spec = replace(weight, bits=8 if weight.bits >= 7 else weight.bits, granularity=PerChannel(0))
    _set_module(model, name, QuantEmbedding.from_float(mod, name, spec))
    info.layer_kinds[name] = "Embedding"


def quantize_embeddings_(model: nn.Module, recipe: Recipe | None = None) -> list[str]:
    """Make every ``nn.Embedding`` of ``model`` an int8 per-row table (for static or weight-only models too).

    Returns:
        the names of the quantized tables.
    """
    recipe = recipe or dynamic_recipe()
    info = PrepareInfo(recipe=recipe, traced=False)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Embedding:
            _quantize_embedding(model, name, mod, recipe, info)
    return list(info.layer_kinds)


def dynamic_layers(model: nn.Module) -> list[tuple[str, DynamicMixin]]:
    """Every dynamically quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicMixin)]
