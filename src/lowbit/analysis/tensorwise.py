"""Cumulative error of every quantized activation as the PyTorch simulation computes it.

This is the simulation's side of ``analysis.onnx_tensors`` (which reads the same tensors from ONNX Runtime).
Every *call* of an active activation quantizer (weight quantizers excluded) quantizes one tensor; the calls
are numbered in execution order, the order in which the ONNX export writes their ``QuantizeLinear`` nodes.
For each call:

    out = the quantizer's output with every quantizer on (the value the next layer consumes)
    ref = the quantizer's output with every quantizer off (it then passes its FP32 input through)
    SQNR = 10 · log10(Σ ref² / Σ (ref − out)²)        (running sums over batches, :class:`ErrorStats`)

plus the same figures for the model output. Only one batch of FP32 activations is held at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lowbit.device import model_device
from lowbit.analysis.layerwise import ErrorStats, QuantizerSwitch, first_output
from lowbit.nn import QuantLayerMixin, TensorQuantizer

log = logging.getLogger(__name__)


@dataclass
class TensorError:
    """Error of one quantized activation (one quantizer call) against FP32.

    Attributes:
        quantizer: qualified name of the quantizer (``TensorQuantizer.qname``).
        scale: its scale (numpy float32, flattened).
        zero_point: its zero-point (numpy int64, flattened).
        stats: running SQNR / cosine / MSE sums.
    """

    quantizer: str
    scale: np.ndarray
    zero_point: np.ndarray
    stats: ErrorStats = field(default_factory=ErrorStats)


def activation_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Active quantizers of ``model`` that quantize activations (every weight quantizer left out)."""
    weights = {id(m.weight_quantizer) for m in model.modules() if isinstance(m, QuantLayerMixin)}
    return [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_active and id(m) not in weights]


def _calls(model: nn.Module, quantizers: list[TensorQuantizer], x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """``([(quantizer, output), ...] in call order, model output)`` for one forward pass on ``x``."""
    seen: list[tuple[TensorQuantizer, torch.Tensor]] = []
    hooks = [q.register_forward_hook(lambda mod, _inp, out: seen.append((mod, out.detach()))) for q in quantizers]
    try:
        with torch.no_grad():
            out = first_output(model(x)).detach()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def quantized_activation_errors(model: nn.Module, inputs: torch.Tensor,
                                batch_size: int = 8) -> tuple[list[TensorError], ErrorStats]:
    """Error of every quantized activation of a converted model (call order) and of its output, vs FP32.

    Args:
        model: a converted (frozen) model.
        inputs: evaluation inputs ``[N, ...]``, streamed in batches.
        batch_size: samples per forward pass.

    Returns:
        ``(per-call errors, output error)``.

    Raises:
        RuntimeError: the quantizers are called in a different order in two passes (a data-dependent graph).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    quantizers = activation_quantizers(model)
    switch = QuantizerSwitch(model)
    errors: list[TensorError] | None = None
    output = ErrorStats()
    model.eval()
    device = model_device(model)
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start:start + batch_size].to(device)
        switch.all(False)
        try:
            ref_calls, ref_out = _calls(model, quantizers, x)
        finally:
            switch.restore()
        calls, out = _calls(model, quantizers, x)
        order = [q for q, _ in calls]
        names = [q.qname for q in order]
        if [q for q, _ in ref_calls] != order or (errors is not None and [e.quantizer for e in errors] != names):
            raise RuntimeError("the activation quantizers ran in a different order in two forward passes")
        if errors is None:
            errors = [TensorError(q.qname, q.scale.detach().cpu().numpy().astype(np.float32).ravel(),
                                  q.zero_point.detach().cpu().numpy().astype(np.int64).ravel()) for q in order]
        for err, (_, ref), (_, val) in zip(errors, ref_calls, calls):
            err.stats.update(ref, val)
        output.update(ref_out, out)
        del ref_calls, calls
    log.info("simulation: %d quantized activations on %d samples", len(errors or []), inputs.shape[0])
    return errors or [], output


def match_by_qparams(errors: list[TensorError], qparams: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """True when the ``i``-th quantizer call has the ``i``-th ``(scale, zero_point)`` for every ``i``.

    ``qparams`` are the engine's QuantizeLinear parameters in graph order: equal counts and bit-equal
    parameters confirm that call order and graph order name the same tensors.
    """
    if len(errors) != len(qparams):
        return False
    for err, (scale, zp) in zip(errors, qparams):
        scale = np.asarray(scale, dtype=np.float32).ravel()
        zp = np.asarray(zp).astype(np.int64).ravel()
        if scale.shape != err.scale.shape or not np.array_equal(scale, err.scale):
            return False
        if zp.shape != err.zero_point.shape or not np.array_equal(zp, err.zero_point):
            return False
    return True
