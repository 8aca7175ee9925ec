"""Sensitivity of the task metric to each quantized site, and a gradient score as a fast first pass.

Sweeps (as AIMET does), each a full pass over the data compared with the FP32 outputs by
``metric_fn(outputs_fp32, outputs_quant) -> float`` (default: top-1 agreement):

* ``metric_one_quantized``: only this site's quantizers on, everything else float;
* ``metric_one_float``: every quantizer on except this site's;
* ``metric_weight_only`` / ``metric_input_only``: only this site's weight / input quantizers on.

``sensitivity = metric_fp32_vs_fp32 − metric_one_quantized`` (the metric lost by quantizing this site
alone; higher is worse) and ``recovery = metric_one_float − metric_all_quantized`` (what keeping it float
wins back). Sites are measured worst-first (by isolated SQNR) until ``budget_seconds`` is spent; the
rest are marked ``"not measured"``.

Gradient score (FP32 model, ``L = cross_entropy(logits, argmax(logits))`` — the model against its own
prediction): ``g_l = mean |∂L/∂W_l|`` and the saliency ``t_l = mean |W_l ⊙ ∂L/∂W_l|`` (first-order
change of L per relative weight change); ``grad_score = g_l / mean_k g_k`` and
``grad_saliency = t_l / mean_k t_k`` (informative only: a mean over few weights, e.g. a first conv on one
input channel, inflates it). The "2x rule" flags a site whose ``grad_score`` exceeds 2. Note the score is
relative: scaling one layer's weights *down* raises its score (every other layer's gradient shrinks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.analysis.layerwise import QuantizerSwitch, Site, first_output
from lowbit.analysis.metrics import top1_agreement
from lowbit.data import iter_batches, run_batch

log = logging.getLogger(__name__)

NOT_MEASURED = "not measured"
GRAD_RULE = 2.0
SWEEPS = ("metric_one_quantized", "metric_one_float", "metric_weight_only", "metric_input_only")


def model_outputs(model: nn.Module, data, batch_size: int) -> torch.Tensor:
    """Model outputs over all of ``data`` (only the final outputs are kept, not activations)."""
    outs = []
    with torch.no_grad():
        for batch in iter_batches(data, batch_size):
            outs.append(first_output(run_batch(model, batch)).detach().float())
    return torch.cat(outs)


def _pattern(switch: QuantizerSwitch, site: Site, sweep: str) -> list:
    own = site.quantizers
    weight = [site.weight_quantizer] if site.weight_quantizer is not None else []
    inputs = [q for q in own if q is not site.weight_quantizer]
    if sweep == "metric_one_quantized":
        return own
    if sweep == "metric_one_float":
        ids = {id(q) for q in own}
        return [q for q in switch.controlled if id(q) not in ids]
    if sweep == "metric_weight_only":
        return weight
    return inputs


def sweep_sensitivity(model: nn.Module, sites: list[Site], data, ref: torch.Tensor, metric_all: float,
                      order: list[str], metric_fn: Callable | None = None, budget_seconds: float = 60.0,
                      batch_size: int = 32, progress: Callable | None = None) -> dict[str, dict]:
    """Run the sweeps of the module doc, worst site first (``order``), within ``budget_seconds``.

    Args:
        ref: FP32 model outputs over ``data``; metric_all: ``metric_fn(ref, fully quantized outputs)``.
        progress: called as ``progress(done, total, description)`` after every pass.

    Returns:
        site name → ``{sweep: value or "not measured", "sensitivity", "recovery"}``.
    """
    metric_fn = metric_fn or top1_agreement
    switch = QuantizerSwitch(model)
    by_name = {s.name: s for s in sites}
    results = {s.name: {k: NOT_MEASURED for k in (*SWEEPS, "sensitivity", "recovery")} for s in sites}
    jobs = [(name, sweep) for sweep in SWEEPS[:2] for name in order] + \
           [(name, sweep) for sweep in SWEEPS[2:] for name in order if by_name[name].weight_quantizer is not None]
    t0 = time.perf_counter()
    base = metric_fn(ref, ref)
    try:
        for done, (name, sweep) in enumerate(jobs):
            if time.perf_counter() - t0 >= budget_seconds:
                log.info("sensitivity budget of %.1f s spent: %d of %d passes not measured",
                         budget_seconds, len(jobs) - done, len(jobs))
                break
            on = _pattern(switch, by_name[name], sweep)
            switch.only(on)
            value = float(metric_fn(ref, model_outputs(model, data, batch_size)))
            row = results[name]
            row[sweep] = value
            if sweep == "metric_one_quantized":
                row["sensitivity"] = base - value
            elif sweep == "metric_one_float":
                row["recovery"] = value - metric_all
            if progress is not None:
                progress(done + 1, len(jobs), f"{sweep} {name}")
    finally:
        switch.restore()
    return results


def gradient_scores(model: nn.Module, sites: list[Site], data, batch_size: int = 32,
                    max_batches: int = 4) -> dict[str, dict]:
    """``grad_score`` and ``grad_saliency`` per weighted site (module doc), all quantizers disabled.

    Returns:
        site name → ``{"grad_score", "grad_saliency", "grad_flag"}`` (only sites with a weight).
    """
    weighted = [s for s in sites if isinstance(getattr(s.module, "weight", None), torch.Tensor)]
    if not weighted:
        return {}
    switch = QuantizerSwitch(model)
    switch.all(False)
    params = [s.module.weight for s in weighted]
    device = params[0].device  # the sums stay on the model's device: one copy each at the end
    grads = {s.name: torch.zeros((), dtype=torch.float64, device=device) for s in weighted}
    sal = {s.name: torch.zeros((), dtype=torch.float64, device=device) for s in weighted}
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for i, batch in enumerate(iter_batches(data, batch_size)):
            if i >= max_batches:
                break
            with torch.enable_grad():
                logits = first_output(run_batch(model, batch))
                logits = logits.reshape(-1, logits.shape[-1])
                loss = F.cross_entropy(logits, logits.argmax(dim=-1).detach())
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            for s, p, g in zip(weighted, params, gs):
                if g is not None:
                    grads[s.name] += g.detach().abs().double().mean()
                    sal[s.name] += (g.detach() * p.detach()).abs().double().mean()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        switch.restore()
    return _relative(grads, sal)


def _relative(grads: dict, sal: dict) -> dict[str, dict]:
    g_mean = sum(float(v) for v in grads.values()) / len(grads)
    t_mean = sum(float(v) for v in sal.values()) / len(sal)
    out = {}
    for name in grads:
        g = float(grads[name]) / g_mean if g_mean > 0 else 0.0
        t = float(sal[name]) / t_mean if t_mean > 0 else 0.0
        out[name] = {"grad_score": g, "grad_saliency": t, "grad_flag": g > GRAD_RULE}
    return out
