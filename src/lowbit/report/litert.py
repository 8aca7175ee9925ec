"""Measure an FP32 / INT8 pair of ``.tflite`` files on the LiteRT interpreter, and render the report.

Every INT8 figure comes from the interpreter (XNNPACK delegate, the default an app gets) running
``model_int8.tflite``; the PyTorch simulation only enters through the parity check. Op types and the int8
coverage are read from the flatbuffers themselves.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.export.litert import float_head
from lowbit.export.litert_flatbuffer import op_summary
from lowbit.export.litert_runtime import latencies_ms, output_step, predictor
from lowbit.export.runtime import ParityResult, parity
from lowbit.report.evaluate import EvalSet, _metric, pair_figures, torch_predict
from lowbit.report.render import accuracy_rows, float_layer_lines, op_counts, size_row

log = logging.getLogger(__name__)

EXTRA_OPS = ("TRANSPOSE", "PAD", "PADV2", "QUANTIZE", "DEQUANTIZE")


def _extra_ops(fp32_ops: dict, int8_ops: dict, weight_dequantize: int = 0) -> dict[str, int]:
    """Layout / conversion ops the INT8 file has beyond the FP32 one (the float interface's two and the
    DEQUANTIZE ops of int8 weight constants, run once at allocation, excepted)."""
    extra = {op: int8_ops.get(op, 0) - fp32_ops.get(op, 0) for op in EXTRA_OPS}
    extra["QUANTIZE"] = max(0, extra["QUANTIZE"] - 1)
    extra["DEQUANTIZE"] = max(0, extra["DEQUANTIZE"] - 1 - weight_dequantize)
    return {op: n for op, n in extra.items() if n > 0}


def evaluate_litert_pair(fp32_path: Path, int8_path: Path, sim_model: nn.Module, ev: EvalSet, threads: int = 2,
                         repeats: int = 30) -> dict:
    """All report figures for one FP32 / INT8 ``.tflite`` pair (keys of the ONNX report, batch 1 only)."""
    fp32_pred, int8_pred = predictor(fp32_path, threads), predictor(int8_path, threads)
    ref, out = fp32_pred(ev.inputs), int8_pred(ev.inputs)
    ops8, ops32 = op_summary(int8_path.read_bytes()), op_summary(fp32_path.read_bytes())
    step = output_step(int8_path)
    head = _float_head_op(ops8)
    with (float_head(sim_model) if head else contextlib.nullcontext()):  # simulate the file's float logits
        sim_pred = torch_predict(sim_model)
        sim = sim_pred(ev.inputs)
        sim_metric = _metric(ev, sim_pred, ref, sim)
    lat = latencies_ms({"fp32": fp32_path, "int8": int8_path}, ev.inputs, threads, repeats)
    par = code_parity(sim, out, step)
    fig = {
        **pair_figures(ev, fp32_pred, int8_pred, ref, out, (fp32_path, int8_path), threads),
        "metric_int8_simulated": sim_metric,
        "head": "float" if head else "int8",
        "parity_ok": par.ok,
        "parity": par.to_dict(),
        "latency_ms_fp32_b1": lat["fp32"],
        "latency_ms_int8_b1": lat["int8"],
        "litert_ops_int8": ops8.to_dict(),
        "litert_ops_fp32": dict(ops32.ops),
        "int8_coverage": ops8.coverage(),
        "extra_layout_ops": _extra_ops(dict(ops32.ops), dict(ops8.ops), ops8.weight_dequantize),
    }
    fig["slowdown"] = None
    if fig["latency_ms_int8_b1"] > fig["latency_ms_fp32_b1"]:
        fig["slowdown"] = (f"INT8 is slower than FP32 on the LiteRT interpreter at batch 1 "
                           f"({fig['latency_ms_int8_b1']:.2f} vs {fig['latency_ms_fp32_b1']:.2f} ms)")
        log.warning("%s: %s", int8_path, fig["slowdown"])
    return fig


def code_parity(sim: torch.Tensor, out: torch.Tensor, step: float | None) -> ParityResult:
    """Parity within one step of the int8 output codes, compared as codes.

    Both outputs are ``(q - z) · s`` in float32; comparing them as floats, a one-code difference of a large logit
    exceeds ``s`` by a few float32 ulps of the logit, so the comparison is made on ``round(y / s)``.
    """
    if step is None:
        return parity(sim, out)
    codes = parity(torch.round(sim.double() / step), torch.round(out.double() / step), 1.0)
    return ParityResult(codes.ok, codes.fraction_within_step, codes.max_abs_diff * step, step, codes.elements)


HEAD_OPS = ("FULLY_CONNECTED",)
HEAD_REASON = ("float on purpose (head=float, the default with float input/output): the output layer reads the "
               "dequantized int8 activations and returns float logits, its weights stored as int8 behind a "
               "DEQUANTIZE, as the ONNX Runtime target keeps the classifier's output float; int8 logits cost top-1 "
               "agreement (EfficientNet-Lite0: 0.910 vs 0.949). --io int8 gives an all-int8 file with int8 logits")


def _float_head_op(ops) -> dict | None:
    """The float compute op that writes a model output (the float head), if any."""
    outputs = set(ops.output_names)
    return next((op for op in ops.float_compute if op["output"] in outputs and op["op"] in HEAD_OPS), None)


def float_compute_layers(fig: dict) -> list[dict]:
    """Compute ops the INT8 file runs in float, as ``float_layers`` entries (the float head with its reason)."""
    ops = fig["litert_ops_int8"]
    outputs = set(ops.get("output_names", []))
    return [{"layer": op["output"], "op": op["op"],
             "reason": HEAD_REASON if op["output"] in outputs and fig.get("head") == "float" else
             f"{op['op']}: no int8 form in LiteRT for it here; runs in float between DEQUANTIZE and QUANTIZE"}
            for op in ops["float_compute_ops"]]


def summary_rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, FP32, INT8) rows of the LiteRT report."""
    speed = r["latency_ms_fp32_b1"] / r["latency_ms_int8_b1"]
    return [
        *accuracy_rows(r),
        size_row(r),
        ("LiteRT latency batch 1, ms (median, XNNPACK)", f"{r['latency_ms_fp32_b1']:.3g}",
         f"{r['latency_ms_int8_b1']:.3g} ({speed:.2f}x)"),
        ("int8 coverage of compute ops", "", f"{r['int8_coverage'] * 100:.1f}%"),
    ]


def to_markdown(r: dict) -> str:
    """A human-readable Markdown report for target ``litert``."""
    par, ops = r.get("parity", {}), r["litert_ops_int8"]
    lines = [
        f"# lowbit INT8 report: {r.get('model', 'model')} → LiteRT",
        "",
        f"Recipe `{r.get('recipe', '?')}`, calibrator `{r.get('calibrator', '?')}`, target `litert`, "
        f"{r.get('io', 'float')} input/output, {r.get('head', 'int8')} logits; "
        f"{r.get('eval_samples', '?')} evaluation samples"
        f"{(' — ' + r['eval_note']) if r.get('eval_note') else ''}. All INT8 figures are measured on the LiteRT "
        f"interpreter {r.get('litert_version', '')} (XNNPACK delegate, {r.get('threads', '?')} threads) running "
        "`model_int8.tflite`.",
        "",
        "| measure | FP32 | INT8 |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in summary_rows(r)],
        "",
        "## Parity: PyTorch simulation vs LiteRT interpreter",
        "",
        f"{'OK' if r['parity_ok'] else 'FAILED'}: {par.get('fraction_within_step', 0) * 100:.3f}% of "
        f"{par.get('elements', 0):,} output elements agree within one output step ({par.get('step', 0):.4g}); "
        f"max difference {par.get('max_abs_diff', 0):.4g}. Simulated INT8 metric: "
        f"{r.get('metric_int8_simulated', float('nan')):.4f}.",
        "",
        "## What the .tflite files contain",
        "",
        f"- INT8 file, int8 ops: {op_counts(ops['int8_ops'])}",
        f"- INT8 file, float ops: {op_counts(ops['float_ops'])}",
        f"- INT8 file, all op types: {op_counts(ops['op_types'])}",
        f"- FP32 file: {op_counts(r['litert_ops_fp32'])}",
        f"- layout / conversion ops beyond the FP32 file: {op_counts(r.get('extra_layout_ops', {}))}",
        *([f"", f"**Warning: {r['slowdown']}.**"] if r.get("slowdown") else []),
        "",
        *float_layer_lines(r),
    ]
    return "\n".join(lines) + "\n"
