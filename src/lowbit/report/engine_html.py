"""The "ONNX Runtime (deployed engine) vs simulation" section of ``analysis.html``.

Input: the ``analysis_onnxruntime.json`` content written by ``lowbit analyze --engine onnxruntime``. One
point per activation the INT8 model quantizes (graph order), then the model output:

* engine: ``sqnr_db``, the dequantized codes ONNX Runtime computes for that tensor vs the FP32 export;
* simulation: ``sim_sqnr_db``, the same tensor in the PyTorch simulation (the ``quantizer`` named in the
  row, matched to the QuantizeLinear by execution order and identical scale / zero-point) vs FP32.

Both are cumulative (every quantizer before the tensor on). ``gap = engine − simulation`` in dB; a negative
gap means the engine loses more than the simulation predicts there. Inline SVG and escaped text only.
"""

from __future__ import annotations

import math

from lowbit.report.html import _esc, _fmt, as_float, line_chart

ENGINE_COLUMNS = (("tensor", "tensor"), ("consumer", "consumer"), ("quantizer", "quantizer (simulation)"),
                  ("sqnr_db", "ONNX Runtime SQNR dB"), ("sim_sqnr_db", "simulation SQNR dB"), ("gap", "gap dB"),
                  ("cosine", "ONNX Runtime cosine"), ("sim_cosine", "simulation cosine"),
                  ("saturation_rate", "saturation"))
GAP_TOLERANCE_DB = 0.01  # |gap| below this: engine and simulation agree

def sqnr_gap(row: dict) -> float | None:
    """``engine SQNR − simulation SQNR`` in dB; None when either is missing or not finite."""
    eng, sim = as_float(row.get("sqnr_db")), as_float(row.get("sim_sqnr_db"))
    if eng is None or sim is None or not (math.isfinite(eng) and math.isfinite(sim)):
        return None
    return eng - sim


def engine_chart(rows: list[dict]) -> str:
    """Cumulative SQNR of every quantized tensor: ONNX Runtime next to the simulation (inline SVG)."""
    label = ("SQNR of every quantized activation in graph order: ONNX Runtime running the INT8 model vs the "
             "PyTorch simulation of the same tensor, in dB (higher is better)")
    series = [("simulation", [r.get("sim_sqnr_db") for r in rows], "simulation (PyTorch, same tensor)"),
              ("engine", [r.get("sqnr_db") for r in rows], "ONNX Runtime (deployed INT8 model)")]
    return line_chart("chart-engine", [str(r.get("tensor", "")) for r in rows], series, label,
                      "quantized tensor (graph order)")


def engine_table(rows: list[dict]) -> str:
    """One row per tensor; the row of the largest engine-below-simulation gap is highlighted."""
    gaps = [sqnr_gap(r) for r in rows]
    known = [(g, i) for i, g in enumerate(gaps) if g is not None]
    worst = min(known)[1] if known else None
    head = "".join(f"<th>{_esc(text)}</th>" for _, text in ENGINE_COLUMNS)
    body = []
    for i, (r, gap) in enumerate(zip(rows, gaps)):
        cells = []
        for key, _ in ENGINE_COLUMNS:
            v = gap if key == "gap" else r.get(key)
            cls = ' class="text"' if as_float(v) is None or isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_esc(_fmt(v))}</td>")
        flagged = ' class="flagged"' if i == worst and gap < -GAP_TOLERANCE_DB else ""
        body.append(f"<tr{flagged}>{''.join(cells)}</tr>")
    return f'<table id="engine-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _engine_summary(engine: dict, rows: list[dict]) -> str:
    items = [f"{len(rows)} tensors compared on {engine.get('samples', '?')} samples"]
    if engine.get("simulation_matched") is False:
        items.append("simulation figures missing: the simulation's quantizers did not line up with the graph")
    gaps = [(g, r) for r in rows if (g := sqnr_gap(r)) is not None]
    if gaps:
        g, r = min(gaps, key=lambda p: p[0])
        items.append(f"largest engine-below-simulation gap: {g:+.2f} dB at {r.get('tensor')}" if g < -GAP_TOLERANCE_DB
                     else f"the engine is nowhere more than {GAP_TOLERANCE_DB} dB below the simulation")
        items.append(f"mean |gap|: {sum(abs(v) for v, _ in gaps) / len(gaps):.3g} dB over {len(gaps)} tensors")
    bad = engine.get("first_nonfinite_tensor")
    items.append(f"first tensor with NaN/Inf in ONNX Runtime: {bad}" if bad else "no NaN/Inf in ONNX Runtime")
    return '<ul id="engine-summary">' + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def engine_section(engine: dict) -> str:
    """The whole section (heading, explanation, summary, chart, table) as HTML."""
    rows = list(engine.get("rows") or [])
    note = ("Every activation the exported INT8 model quantizes, in graph order, then the model output. "
            "ONNX Runtime: the dequantized codes the engine computes for that tensor, compared with the FP32 "
            "ONNX export. Simulation: the same tensor in the PyTorch simulation, compared with FP32. Both are "
            "cumulative (every quantizer before the tensor on). Gap = ONNX Runtime − simulation (dB); a "
            "negative gap means the deployed model loses more than the simulation predicts.")
    return "\n".join(["<h2>ONNX Runtime (deployed engine) vs simulation</h2>", f'<p class="note">{_esc(note)}</p>',
                      _engine_summary(engine, rows), engine_chart(rows), engine_table(rows)])
