"""The post-training pipeline, in one explicit order.

    prepare_ → cle → calibrate → convert_ → adaround | gptq → bias_correction → (bias range refit)

A recipe names the passes it wants (``passes: [cle, bias_correction, adaround]``); they always run in the
order of :data:`lowbit.transforms.pass_registry.PASS_REGISTRY` (name → handler and stage), whatever order they
are listed in. Every pass has the signature ``apply(model, forward_loop)``.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from lowbit.data import Data
from lowbit.device import copy_to, model_device, resolve_device
from lowbit.progress import progress_steps
from lowbit.nn import engine_emulation
from lowbit.ptq.calibrate import calibrate
from lowbit.ptq.capture import ForwardLoop
from lowbit.ptq.recurrent import check_recurrent
from lowbit.transforms.pass_registry import PASS_REGISTRY, POST_CALIBRATION, PRE_CALIBRATION, ordered
from lowbit.transforms.prepare import convert_, prepare_, quant_layers
from lowbit.transforms.recipe import Recipe

log = logging.getLogger(__name__)

def run_passes(model: nn.Module, names: list[str], loop: ForwardLoop, timings: dict[str, float],
               show_progress: bool = True) -> None:
    """Run ``names`` (already ordered) on ``model``, recording seconds per pass into ``timings`` (and reporting
    one step per pass to ``lowbit.progress`` when ``show_progress``)."""
    for name in progress_steps(names, "post-training passes", enabled=show_progress) if names else ():
        t0 = time.perf_counter()
        PASS_REGISTRY[name].load()(model, loop)
        timings[name] = time.perf_counter() - t0
        log.info("pass %s: %.1f s", name, timings[name])


def quantize(model: nn.Module, calib_data: Data, recipe: Recipe, example_input: torch.Tensor | None = None,
             show_progress: bool = True, pass_batches: int | None = None,
             timings: dict[str, float] | None = None, device: str | torch.device | None = None,
             memory_budget_mb: float | None = None) -> nn.Module:
    """prepare_ → calibrate → convert_ on a copy of ``model``, with the recipe's passes in pipeline order;
    returns the converted (fake-quantized) model (``lowbit.quantize``).

    Args:
        pass_batches: the passes see at most this many calibration batches (None: all); calibration itself
            always uses all of them.
        timings: filled with seconds per pass when given.
        device: where the copy runs: ``"cpu"``, ``"cuda"`` / ``"cuda:N"``, ``"auto"`` (CUDA when available)
            or a ``torch.device``; None keeps ``model``'s device. Batches move there one at a time, so the
            calibration data may stay on the CPU. The returned model and all its state live there.
        memory_budget_mb: activations the layer-wise passes may keep (``lowbit.ptq.frontier``; None: 2 GiB,
            0: keep none and re-run the model up to each layer).

    Raises:
        ValueError: an LSTM / GRU / RNN layer that no recipe rule keeps in float (``ptq.recurrent``).
        DeviceError: ``device`` names CUDA on a machine without it (a ``ValueError``).
    """
    timings = {} if timings is None else timings
    names = ordered(recipe.passes)
    target = model_device(model) if device is None else resolve_device(device, "device=")
    kept_recurrent = check_recurrent(model, recipe)  # static recipe: no LSTM / GRU unless kept float
    prepared = prepare_(copy_to(model, target).eval(), recipe, example_input)
    log.info("quantizing on %s", target)
    info = getattr(prepared, "lowbit_info", None)
    if info is not None:
        info.float_layers.extend(k for k in kept_recurrent if k[0] not in {n for n, _ in info.float_layers})
    budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
    loop = ForwardLoop(calib_data, max_batches=pass_batches, frontier_bytes=budget)
    run_passes(prepared, [n for n in names if PASS_REGISTRY[n].stage == PRE_CALIBRATION], loop, timings, show_progress)
    t0 = time.perf_counter()
    calibrate(prepared, calib_data, show_progress=show_progress)
    convert_(prepared)
    timings["calibrate"] = time.perf_counter() - t0
    post = [n for n in names if PASS_REGISTRY[n].stage == POST_CALIBRATION]
    with engine_emulation(prepared, False):
        run_passes(prepared, post, loop, timings, show_progress)
    if post:
        for name, layer in quant_layers(prepared):
            raised = layer.fit_bias_range_()
            if raised:
                log.info("%s: raised %d weight scales so int32 bias codes fit after the passes", name, raised)
    return prepared
