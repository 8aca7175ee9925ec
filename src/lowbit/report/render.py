"""Render a PTQ report as JSON and Markdown.

``report.json`` keys (at least): ``metric_fp32``, ``metric_int8``, ``top1_agreement``, ``kl``, ``sqnr_db``,
``size_bytes_fp32``, ``size_bytes_int8``, ``latency_ms_fp32_b1``, ``latency_ms_int8_b1``,
``latency_ms_fp32_b32``, ``latency_ms_int8_b32``, ``parity_ok``, ``float_layers``.

What ONNX Runtime executes (``report.engine_ops``): ``int8_kernels`` (count of integer kernel nodes),
``integer_kernel_ops``, ``qdq_conversion_ops``, ``float_ops`` (op → count, a partition of ``executed_op_types``),
``float_heavy_ops`` (``{"layer", "op", "reason"}`` per Conv / MatMul / Gemm / LSTM / ... run in float, merged
into ``float_layers``) and ``slowdown`` (a sentence when INT8 is slower than FP32, else None).
"""

from __future__ import annotations

import json
import math

REQUIRED_KEYS = (
    "metric_fp32", "metric_int8", "top1_agreement", "kl", "sqnr_db", "size_bytes_fp32", "size_bytes_int8",
    "latency_ms_fp32_b1", "latency_ms_int8_b1", "latency_ms_fp32_b32", "latency_ms_int8_b32", "parity_ok",
    "float_layers",
)


# LiteRT files are converted for batch 1: no batch-32 latency.
LITERT_REQUIRED_KEYS = tuple(k for k in REQUIRED_KEYS if not k.endswith("_b32")) + ("target",)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(report: dict) -> str:
    """JSON text; non-finite floats (an identical output has SQNR = inf) are written as strings."""
    required = LITERT_REQUIRED_KEYS if report.get("target") == "litert" else REQUIRED_KEYS
    missing = [k for k in required if k not in report]
    if missing:
        raise ValueError(f"report is missing key {missing[0]!r}")
    return json.dumps(_json_safe(report), indent=2) + "\n"


def accuracy_rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, FP32, INT8) rows of the output figures every target's report shows (metric, agreement, KL,
    SQNR, cosine)."""
    return [
        (f"metric ({r.get('metric_name', 'metric')})", f"{r['metric_fp32']:.4f}", f"{r['metric_int8']:.4f}"),
        ("top-1 agreement with FP32", "1.0000", f"{r['top1_agreement']:.4f}"),
        ("KL(FP32 ‖ INT8), nats", "0", f"{r['kl']:.5f}"),
        ("output SQNR, dB (higher is better)", "∞", f"{r['sqnr_db']:.2f}"),
        ("output cosine", "1.0000", f"{r['cosine']:.5f}"),
    ]


def size_row(r: dict) -> tuple[str, str, str]:
    """(measure, FP32, INT8) row of the two files' sizes."""
    return ("model size, bytes", f"{r['size_bytes_fp32']:,}",
            f"{r['size_bytes_int8']:,} ({r['size_bytes_fp32'] / r['size_bytes_int8']:.2f}x smaller)")


def summary_rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, FP32, INT8) rows shared by the Markdown report and the terminal table."""
    speed1 = r["latency_ms_fp32_b1"] / r["latency_ms_int8_b1"]
    speed32 = r["latency_ms_fp32_b32"] / r["latency_ms_int8_b32"]
    return [
        *accuracy_rows(r),
        ("output MSE", "0", f"{r['mse']:.3g}"),
        size_row(r),
        ("latency batch 1, ms (median)", f"{r['latency_ms_fp32_b1']:.2f}", f"{r['latency_ms_int8_b1']:.2f} ({speed1:.2f}x)"),
        ("latency batch 32, ms (median)", f"{r['latency_ms_fp32_b32']:.2f}", f"{r['latency_ms_int8_b32']:.2f} ({speed32:.2f}x)"),
    ]


def to_markdown(r: dict) -> str:
    """A human-readable Markdown report."""
    if r.get("target") == "litert":
        from lowbit.report.litert import to_markdown as litert_markdown

        return litert_markdown(r)
    lines = [
        f"# lowbit INT8 report: {r.get('model', 'model')}",
        "",
        f"Recipe `{r.get('recipe', '?')}`, calibrator `{r.get('calibrator', '?')}`, target `{r.get('target', '?')}`; "
        f"{r.get('eval_samples', '?')} evaluation samples{(' — ' + r['eval_note']) if r.get('eval_note') else ''}. "
        f"All INT8 figures are measured on ONNX Runtime {r.get('onnxruntime_version', '')} running `model_int8.onnx` "
        f"with {r.get('threads', '?')} threads.",
        "",
        "Post-training passes: " + (", ".join(f"{p} ({r.get('pass_seconds', {}).get(p, 0):.1f} s)" for p in r["passes"])
                                    if r.get("passes") else "none (round to nearest)") + ".",
        "",
        "| measure | FP32 | INT8 |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(r)]
    par = r.get("parity", {})
    lines += [
        "",
        "## Parity: PyTorch simulation vs ONNX Runtime",
        "",
        f"{'OK' if r['parity_ok'] else 'FAILED'}: {par.get('fraction_within_step', 0) * 100:.3f}% of "
        f"{par.get('elements', 0):,} output elements agree within one output step ({par.get('step', 0):.4g}); "
        f"max difference {par.get('max_abs_diff', 0):.4g}. Simulated INT8 metric: {r.get('metric_int8_simulated', float('nan')):.4f}.",
        "",
        *segment_lines(par.get("segment")),
        *(["This model targets TensorRT; every figure here, parity included, is measured on ONNX Runtime's CPU "
           "kernels (which saturate 8-bit weights on CPUs without VNNI), not on TensorRT.", ""]
          if r.get("target") == "tensorrt" else []),
        *executed_lines(r),
        "",
        *float_layer_lines(r),
    ]
    return "\n".join(lines) + "\n"


def float_layer_lines(r: dict) -> list[str]:
    """The report's "Layers left in float" section (``float_layers``, with the ONNX node where it differs)."""
    listed = [f"- `{f['layer']}`{_node_note(f)}: {f['reason']}" for f in r["float_layers"]]
    return ["## Layers left in float", "", *(listed or ["None."])]


def segment_lines(seg: dict | None) -> list[str]:
    """The tensor-by-tensor parity paragraph (``export.segment_parity``), when that check ran."""
    if not seg:
        return []
    worst = f"; least agreeing tensor `{seg['worst']}`" if seg["worst"] else ""
    missing = f"; quantizers missing from the file: {', '.join(seg['missing'])}" if seg["missing"] else ""
    return [f"Tensor by tensor (each quantized tensor computed from the engine's own input codes): "
            f"{'OK' if seg['ok'] else 'FAILED'} on {seg['tensors']} tensors, at least "
            f"{seg['min_fraction_equal'] * 100:.4f}% identical codes, at most {seg['max_code_diff']} code(s) apart"
            f"{worst}{missing}; final output {seg['output_fraction_within_step'] * 100:.3f}% within one step. "
            "Where this passes and the output-level check does not, float ops between quantizers (LayerNorm, "
            "GELU, Softmax…) round differently in the last ulp in PyTorch and ONNX Runtime, and the few "
            "flipped codes spread through the depth.", ""]


def op_counts(ops: dict) -> str:
    """``{"Conv": 3}`` → ``"Conv x3"`` (``"none"`` when empty)."""
    return ", ".join(f"{k} x{v}" for k, v in ops.items()) or "none"


def _node_note(entry: dict) -> str:
    return f" (ONNX node `{entry['node']}`)" if entry.get("node") and entry["node"] != entry["layer"] else ""


def executed_lines(r: dict) -> list[str]:
    """What ONNX Runtime executes: integer kernels, Q/DQ conversions and float ops as separate lists."""
    if "integer_kernel_ops" not in r:  # a report from before the split: one list, labelled as such
        return [f"ONNX Runtime executes {r.get('int8_kernels', 0)} integer kernels among: "
                + op_counts(r.get("executed_op_types", {}))]
    heavy = r.get("float_heavy_ops", [])
    lines = [
        "## What ONNX Runtime executes",
        "",
        f"- integer kernels ({sum(r['integer_kernel_ops'].values())}): {op_counts(r['integer_kernel_ops'])}",
        f"- float ↔ integer conversions ({sum(r.get('qdq_conversion_ops', {}).values())}): "
        f"{op_counts(r.get('qdq_conversion_ops', {}))}",
        f"- float ops and data movement ({sum(r.get('float_ops', {}).values())}): {op_counts(r.get('float_ops', {}))}",
        f"- heavy ops (Conv, MatMul, Gemm, LSTM, ...) executed in float: {len(heavy)}"
        + ("" if not heavy else " — " + ", ".join(f"`{h['layer']}` ({h['op']})" for h in heavy)),
    ]
    if r.get("slowdown"):
        lines += ["", f"**Warning: {r['slowdown']}.**"]
    return lines
