"""Report figures for token models: measured on their outputs as a whole (sentence embeddings), any input dtype
(token ids stay int64), dynamic mode included.

``evaluate_onnx_pair`` runs the FP32 and the quantized ONNX file on ONNX Runtime (inputs keep their dtype, so
token ids stay int64) and compares them; for embedding models (``embedding=True``) the task metric is the
mean cosine similarity to FP32 and nearest-neighbour agreement, otherwise the usual top-1 agreement / KL.
Every quantized figure comes from the engine; the simulation enters through the parity check only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis import metrics
from lowbit.analysis.embedding_metrics import mean_cosine, nn_agreement
from lowbit.export.onnx_dynamic import run_onnx_batched
from lowbit.export.runtime import make_session, parity
from lowbit.report.engine_ops import engine_accounting, slowdown
from lowbit.report.evaluate import latencies
from lowbit.report.render import _json_safe, executed_lines

log = logging.getLogger(__name__)

EMBEDDING_METRIC = "embedding_cosine"
INTEGER_KERNELS = ("MatMulNBits", "DynamicQuantizeLinear")


def evaluate_onnx_pair(fp32_path: Path, q_path: Path, sim_model: nn.Module, inputs: torch.Tensor, embedding: bool,
                       threads: int = 2, repeats: int = 20, note: str = "") -> dict:
    """Metric, error, size, kernels, parity and latency of an FP32 / quantized ONNX pair (see module doc)."""
    ref = run_onnx_batched(make_session(fp32_path, threads), inputs)
    out = run_onnx_batched(make_session(q_path, threads), inputs)
    with torch.no_grad():
        sim = torch.cat([sim_model(chunk) for chunk in torch.split(inputs, 32)])
    fig: dict = {"eval_samples": int(inputs.shape[0]), "eval_note": note, "threads": threads}
    if embedding:
        fig.update({"metric_name": "mean cosine similarity to FP32", "metric_fp32": 1.0, "metric_int8": mean_cosine(ref, out),
                    "metric_int8_simulated": mean_cosine(ref, sim), "nn_agreement": nn_agreement(ref, out),
                    "top1_agreement": nn_agreement(ref, out), "kl": float("nan")})
    else:
        fig.update({"metric_name": "top1_agreement", "metric_fp32": 1.0, "metric_int8": metrics.top1_agreement(ref, out),
                    "metric_int8_simulated": metrics.top1_agreement(ref, sim), "top1_agreement": metrics.top1_agreement(ref, out),
                    "kl": metrics.kl_softmax(ref, out)})
    fig.update({"sqnr_db": metrics.sqnr_db(ref, out), "cosine": metrics.cosine(ref, out), "mse": metrics.mse(ref, out),
                "size_bytes_fp32": fp32_path.stat().st_size, "size_bytes_int8": q_path.stat().st_size})
    par = parity(sim, out)
    fig["parity_ok"], fig["parity"] = par.ok, par.to_dict()
    fig.update(engine_accounting(q_path, threads, extra_kernels=("MatMulNBits",)))
    fig["int8_kernels"] += sum(n for op, n in fig["executed_op_types"].items() if op in INTEGER_KERNELS)
    fig.update(latencies(fp32_path, q_path, inputs, threads, repeats))
    fig["slowdown"] = slowdown(fig)
    if fig["slowdown"]:
        log.warning("%s: %s", q_path, fig["slowdown"])
    return fig


def summary_rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, FP32, quantized) rows for the Markdown report and the terminal table."""
    rows = [(f"metric ({r['metric_name']})", f"{r['metric_fp32']:.4f}", f"{r['metric_int8']:.5f}")]
    if "nn_agreement" in r:
        rows.append(("nearest-neighbour agreement with FP32", "1.0000", f"{r['nn_agreement']:.4f}"))
    else:
        rows.append(("top-1 agreement with FP32", "1.0000", f"{r['top1_agreement']:.4f}"))
    speed1 = r["latency_ms_fp32_b1"] / r["latency_ms_int8_b1"]
    speed32 = r["latency_ms_fp32_b32"] / r["latency_ms_int8_b32"]
    rows += [
        ("output SQNR, dB (higher is better)", "∞", f"{r['sqnr_db']:.2f}"),
        ("model size, bytes", f"{r['size_bytes_fp32']:,}", f"{r['size_bytes_int8']:,} ({r['size_bytes_fp32'] / r['size_bytes_int8']:.2f}x smaller)"),
        ("latency batch 1, ms (median)", f"{r['latency_ms_fp32_b1']:.2f}", f"{r['latency_ms_int8_b1']:.2f} ({speed1:.2f}x)"),
        ("latency batch 32, ms (median)", f"{r['latency_ms_fp32_b32']:.2f}", f"{r['latency_ms_int8_b32']:.2f} ({speed32:.2f}x)"),
    ]
    return rows


def to_json(report: dict) -> str:
    """JSON text (non-finite floats as strings)."""
    return json.dumps(_json_safe(report), indent=2) + "\n"


def to_markdown(r: dict) -> str:
    """A human-readable Markdown report of a dynamic / transformer quantization."""
    par = r["parity"]
    lines = [
        f"# lowbit {r.get('mode', '')} quantization report: {r.get('model', 'model')}",
        "",
        f"Mode `{r.get('mode')}`, recipe `{r.get('recipe', '?')}`; {r['eval_samples']} evaluation samples"
        f"{(' — ' + r['eval_note']) if r.get('eval_note') else ''}. Quantized figures are measured on ONNX Runtime "
        f"{r.get('onnxruntime_version', '')} running `model_int8.onnx` with {r['threads']} threads.",
        "",
        "| measure | FP32 | quantized |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in summary_rows(r)],
        "",
        "## Parity: PyTorch simulation vs ONNX Runtime",
        "",
        f"{'OK' if r['parity_ok'] else 'NOT WITHIN ONE STEP'}: {par['fraction_within_step'] * 100:.3f}% of {par['elements']:,} "
        f"output elements agree within one output step ({par['step']:.4g}); max difference {par['max_abs_diff']:.4g}. "
        f"Simulated metric: {r['metric_int8_simulated']:.5f}.",
        "",
        *executed_lines(r),
        "",
        "## Layers left in float",
        "",
        *([f"- `{f['layer']}`: {f['reason']}" for f in r["float_layers"]] or ["None."]),
    ]
    return "\n".join(lines) + "\n"
