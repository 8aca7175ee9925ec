"""Measure an FP32 / INT8 pair of exported models on ONNX Runtime: metric, error, size, speed, parity.

Every INT8 figure comes from the deployed engine (ONNX Runtime running the INT8 ONNX file), not from the
PyTorch simulation; the simulation only enters through the parity check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.device import model_device
from lowbit.analysis import metrics
from lowbit.export.runtime import batched_predict, latency_ms, make_session
from lowbit.export.segment_parity import parity_with_segments
from lowbit.report.engine_ops import engine_accounting, slowdown

log = logging.getLogger(__name__)

Predict = Callable[[torch.Tensor], torch.Tensor]
EvalFn = Callable[[Predict], float]


@dataclass(frozen=True)
class EvalSet:
    """What the report is measured on."""

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    eval_fn: EvalFn | None = None
    metric_name: str = "top1_agreement"
    note: str = ""


def torch_predict(model: nn.Module, batch_size: int = 32) -> Predict:
    """A ``predict(x)`` for a PyTorch module (no grad, batched): each chunk of ``x`` runs on the model's
    device, the outputs come back on the CPU (where labels and ONNX Runtime outputs are)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        device = model_device(model)
        with torch.no_grad():
            return torch.cat([model(chunk.to(device)).cpu() for chunk in torch.split(x, batch_size)])

    return predict


def _metric(ev: EvalSet, predict: Predict, ref_out: torch.Tensor, out: torch.Tensor) -> float:
    if ev.eval_fn is not None:
        return float(ev.eval_fn(predict))
    if ev.labels is not None:
        return metrics.accuracy(out, ev.labels)
    return metrics.top1_agreement(ref_out, out)


def latencies(fp32_path: Path, int8_path: Path, example: torch.Tensor, threads: int, repeats: int) -> dict:
    """Median ONNX Runtime latency of both models at batch 1 and 32 (rows of ``example``'s first row)."""
    out = {}
    for batch in (1, 32):
        x = example[:1].expand(batch, *example.shape[1:]).contiguous()
        out[f"latency_ms_fp32_b{batch}"] = latency_ms(fp32_path, x, threads, repeats)
        out[f"latency_ms_int8_b{batch}"] = latency_ms(int8_path, x, threads, repeats)
    return out


def pair_figures(ev: EvalSet, fp32_pred: Predict, int8_pred: Predict, ref: torch.Tensor, out: torch.Tensor,
                 paths: tuple[Path, Path], threads: int) -> dict:
    """The metric, error and size figures every FP32 / INT8 report has (ONNX Runtime and LiteRT alike)."""
    return {
        "metric_name": ev.metric_name,
        "metric_fp32": _metric(ev, fp32_pred, ref, ref),
        "metric_int8": _metric(ev, int8_pred, ref, out),
        "top1_agreement": metrics.top1_agreement(ref, out),
        "kl": metrics.kl_softmax(ref, out),
        "sqnr_db": metrics.sqnr_db(ref, out),
        "cosine": metrics.cosine(ref, out),
        "mse": metrics.mse(ref, out),
        "size_bytes_fp32": paths[0].stat().st_size,
        "size_bytes_int8": paths[1].stat().st_size,
        "eval_samples": int(ev.inputs.shape[0]),
        "eval_note": ev.note,
        "threads": threads,
    }


def evaluate_pair(
    fp32_path: Path,
    int8_path: Path,
    sim_model: nn.Module,
    ev: EvalSet,
    threads: int = 2,
    repeats: int = 20,
) -> dict:
    """All report figures for one FP32 / INT8 pair (see ``report.render`` for the keys).

    What ONNX Runtime executes (integer kernels, conversions, float heavy ops with their reasons) comes from
    ``report.engine_ops.engine_accounting``; ``slowdown`` is a sentence when INT8 is slower than FP32 at batch 1
    or 32 (also logged as a warning), else None.
    """
    fp32_sess, int8_sess = make_session(fp32_path, threads), make_session(int8_path, threads)
    fp32_pred, int8_pred = batched_predict(fp32_sess), batched_predict(int8_sess)
    ref, out = fp32_pred(ev.inputs), int8_pred(ev.inputs)
    sim_pred = torch_predict(sim_model)
    sim = sim_pred(ev.inputs)
    fig = pair_figures(ev, fp32_pred, int8_pred, ref, out, (fp32_path, int8_path), threads)
    fig["metric_int8_simulated"] = _metric(ev, sim_pred, ref, sim)
    par = parity_with_segments(sim_model, int8_path, ev.inputs, sim, out, threads)
    fig["parity_ok"] = par.ok
    fig["parity"] = par.to_dict()
    fig.update(engine_accounting(int8_path, threads))
    fig.update(latencies(fp32_path, int8_path, ev.inputs, threads, repeats))
    fig["slowdown"] = slowdown(fig)
    if fig["slowdown"]:
        log.warning("%s: %s", int8_path, fig["slowdown"])
    return fig
