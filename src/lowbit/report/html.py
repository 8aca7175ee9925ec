"""Render an analysis (``AnalysisResult.to_json()``) as ONE self-contained HTML page.

No network, no external JS / CSS / fonts: every chart is inline SVG drawn here. Pictures come first
(SQNR per layer, sensitivity ranking, FP32 / quantized / error histograms of the worst layers), the
full per-layer table below. Every piece of text from the analysis goes through :func:`html.escape`.

Non-finite SQNR (``inf`` for a layer whose quantized output is identical, ``nan`` for a broken one,
possibly written as the strings ``"inf"`` / ``"nan"`` by ``to_json``) is clipped to the chart's edge
and marked.
"""

from __future__ import annotations

import html
import logging
import math

log = logging.getLogger(__name__)

COLORS = {"isolated": "#0072B2", "cumulative": "#E69F00", "bar": "#009E73", "fp32": "#0072B2",
          "quant": "#E69F00", "error": "#CC3311", "mark": "#CC3311", "simulation": "#56B4E9", "engine": "#D55E00"}
LEFT_SERIES = {"isolated", "simulation"}  # their non-finite marks are labelled on the left, the others on the right
STROKE = {"simulation": 6}  # drawn wide beneath the engine's line: both stay visible where they coincide
TABLE_FIRST = ("layer", "type", "sqnr_db_isolated", "sqnr_db_cumulative", "cosine_isolated", "cosine_cumulative",
               "mse_isolated", "kl", "hist_overlap", "clip_mse", "round_mse", "saturation_rate", "sensitivity",
               "flags")
NOT_MEASURED = "not measured"

CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
.note{color:#555;font-size:.9em;max-width:70em}
svg{display:block;margin:.5em 0;background:#fff}
svg text{font-family:sans-serif;fill:#222}
table{border-collapse:collapse;font-size:.8em}
th,td{border:1px solid #ccc;padding:2px 5px;vertical-align:top;text-align:right}
td.text,th{text-align:left}
tr.flagged{background:#fff0e0}
pre{margin:0;font-size:.95em;white-space:pre-wrap}
#js-errors:empty{display:none}#js-errors{color:#c00;border:2px solid #c00;padding:.5em}
"""

# Tiny, self-contained: collects script errors into #js-errors, marks the page as rendered.
SCRIPT = """
window.onerror=function(m,s,l){var e=document.getElementById('js-errors');
if(e){e.textContent+=String(m)+' (line '+l+')\\n';}return false;};
document.addEventListener('DOMContentLoaded',function(){document.body.setAttribute('data-rendered','1');});
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def as_float(value) -> float | None:
    """A number from a JSON value: floats, ints and the strings ``"inf"`` / ``"-inf"`` / ``"nan"``; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "-inf", "nan", "infinity", "-infinity"):
        return float(value.strip().lower())
    return None


def _fmt(value) -> str:
    """A table cell's text (numbers to 4 significant digits, lists joined)."""
    num = as_float(value)
    if num is not None and not isinstance(value, int):
        if math.isnan(num):
            return "NaN"
        if math.isinf(num):
            return "∞" if num > 0 else "−∞"
        return f"{num:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _svg_open(chart_id: str, width: int, height: int, label: str) -> str:
    return (f'<svg id="{_esc(chart_id)}" role="img" aria-label="{_esc(label)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_esc(label)}</title>')


def _nice_range(values: list[float]) -> tuple[float, float, float]:
    """``(low, high, tick step)``: a 1-2-5 step, at most 8 ticks, covering the finite ``values`` and 0."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(0.0, min(finite)), max(finite) * 1.05) if finite else (0.0, 10.0)
    raw = max(hi - lo, 8.0) / 8  # at least 1 dB per tick
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    lo, hi = step * math.floor(lo / step), step * math.ceil(hi / step)
    return float(lo), float(hi if hi > lo else lo + step), float(step)


def _y_axis(x0: int, y0: int, y1: int, ticks: tuple[float, float, float], width: int, label: str) -> list[str]:
    """Grid lines, tick labels and a rotated axis label for a vertical value axis from ``y0`` (lo) up to ``y1``."""
    lo, hi, step = ticks
    parts, n = [], round((hi - lo) / step)
    for i in range(n + 1):
        v = lo + step * i
        y = y0 - (y0 - y1) * i / n
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{width - 20}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>')
    parts.append(f'<line x1="{x0}" y1="{y1}" x2="{x0}" y2="{y0}" stroke="#444"/>'
                 f'<line x1="{x0}" y1="{y0}" x2="{width - 20}" y2="{y0}" stroke="#444"/>')
    mid = (y0 + y1) / 2
    lx = max(16, x0 - 44)
    parts.append(f'<text x="{lx}" y="{mid:.1f}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 {lx} {mid:.1f})">{_esc(label)}</text>')
    return parts


def _mark(name: str, x: float, y: float, mark: str) -> str:
    """A triangle (series colour, red outline) and a label for a non-finite value clipped to ``y``.

    The isolated (simulation) series labels to the left, the other one to the right, so both stay readable.
    """
    tx, anchor = (-8, "end") if name in LEFT_SERIES else (8, "start")
    return (f'<path class="nonfinite" d="M{x - 5:.1f},{y + 4:.1f} L{x + 5:.1f},{y + 4:.1f} L{x:.1f},{y - 5:.1f} Z" '
            f'fill="{COLORS[name]}" stroke="{COLORS["mark"]}"><title>{_esc(name)}: {mark} (clipped to the chart '
            f'edge)</title></path><text x="{x + tx:.1f}" y="{y + 4:.1f}" font-size="11" text-anchor="{anchor}" '
            f'fill="{COLORS["mark"]}">{mark}</text>')


def _series(name: str, xs: list[float], vals: list[float | None], to_y, lo: float, hi: float) -> list[str]:
    """Polylines through the values (±inf clipped to the chart's edge and marked; NaN / missing: a gap, marked)."""
    color, parts, run = COLORS[name], [], []
    dx = -3 if name in LEFT_SERIES else 3  # both series non-finite at one layer: keep both marks visible
    for x, v in zip(xs + [None], vals + [None]):
        if x is not None and v is not None and not math.isnan(v):
            run.append((x, to_y(v)))
            if math.isinf(v):
                parts.append(_mark(name, x + dx, to_y(hi if v > 0 else lo), "∞" if v > 0 else "−∞"))
            continue
        if len(run) > 1:
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in run)
            parts.append(f'<polyline class="series-{name}" points="{pts}" fill="none" stroke="{color}" '
                         f'stroke-width="{STROKE.get(name, 2)}"/>')
        run = []
        if x is not None and v is not None:  # NaN: a gap in the line, marked on the bottom edge
            parts.append(_mark(name, x + dx, to_y(lo), "NaN"))
    for x, v in zip(xs, vals):
        if v is not None and math.isfinite(v):
            parts.append(f'<circle cx="{x:.1f}" cy="{to_y(v):.1f}" r="3" fill="{color}"><title>{_esc(name)}: '
                         f'{v:.2f} dB</title></circle>')
    return parts


def line_chart(chart_id: str, names: list[str], series: list[tuple[str, list, str]], label: str,
               x_label: str) -> str:
    """SQNR-style line chart: one x position per name, one polyline per ``(key, values, legend)`` series.

    ``key`` picks the colour (``COLORS``) and the class ``series-<key>``; values are dB (non-finite ones are
    clipped to the chart's edge and marked).
    """
    n = max(len(names), 1)
    width, height, left, top, bottom = max(700, min(1150, 130 + 18 * n)), 440, 110, 60, 300
    vals = [[as_float(v) for v in values] for _, values, _ in series]
    ticks = _nice_range([v for vs in vals for v in vs if v is not None])
    lo, hi = ticks[0], ticks[1]
    span = (width - 20 - left - 20) / max(n - 1, 1)
    xs = [left + 20 + (span * i if n > 1 else (width - left - 40) / 2) for i in range(len(names))]
    to_y = lambda v: bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
    parts = [_svg_open(chart_id, width, height, label)]
    parts += _y_axis(left, bottom, top, ticks, width, "SQNR (dB) — higher is better")
    step = max(1, math.ceil(n / 55))
    for i, (x, name) in enumerate(zip(xs, names)):
        if i % step == 0:
            short = name if len(name) <= 24 else "…" + name[-23:]
            parts.append(f'<text x="{x:.1f}" y="{bottom + 12}" font-size="10" text-anchor="end" '
                         f'transform="rotate(-45 {x:.1f} {bottom + 12})">{_esc(short)}<title>{_esc(name)}</title></text>')
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 6}" font-size="12" text-anchor="middle">'
                 f'{_esc(x_label)}</text>')
    for (key, _, _), v in zip(series, vals):
        parts += _series(key, xs, v, to_y, lo, hi)
    parts += _legend(left, [(key, text) for key, _, text in series])
    parts.append("</svg>")
    return "".join(parts)


def sqnr_chart(rows: list[dict]) -> str:
    """Isolated vs cumulative SQNR (dB) per layer in execution order, as an SVG line chart."""
    label = "SQNR per layer in execution order, isolated vs cumulative, in dB (higher is better)"
    series = [("isolated", [r.get("sqnr_db_isolated") for r in rows], "isolated (this layer alone quantized)"),
              ("cumulative", [r.get("sqnr_db_cumulative") for r in rows],
               "cumulative (all layers up to here quantized)")]
    return line_chart("chart-sqnr", [str(r.get("layer", "")) for r in rows], series, label, "layer (execution order)")


def _legend(left: int, legend: list[tuple[str, str]]) -> list[str]:
    parts = []
    for k, (name, text) in enumerate(legend):
        y = 14 + 16 * k
        parts.append(f'<g class="legend"><line x1="{left + 10}" y1="{y}" x2="{left + 34}" y2="{y}" '
                     f'stroke="{COLORS[name]}" stroke-width="3"/><text x="{left + 40}" y="{y + 4}" '
                     f'font-size="12">{_esc(text)}</text></g>')
    return parts


def sensitivity_chart(rows: list[dict]) -> str:
    """Layers ranked by sensitivity (metric lost when only that layer is quantized) as horizontal bars."""
    pairs = [(r, as_float(r.get("sensitivity"))) for r in rows]
    measured = sorted(((r, v) for r, v in pairs if v is not None and math.isfinite(v)), key=lambda p: -p[1])
    ranked = measured + [(r, None) for r, v in pairs if v is None or not math.isfinite(v)]
    left, bar_w, row_h = 230, 520, 20
    width, height = left + bar_w + 130, 50 + row_h * max(len(ranked), 1) + 30
    vals = [v for _, v in measured]
    vmax = max([abs(v) for v in vals] + [1e-12])
    neg = any(v < 0 for v in vals)
    zero = left + (bar_w / 2 if neg else 0)
    scale = (bar_w / 2 if neg else bar_w) / vmax
    scale_note = f"; max {vmax:.4g}" if vals and vmax > 1e-12 else ("; every measured drop is 0" if vals else "")
    label = "Sensitivity ranking: metric lost when only this layer is quantized (higher is worse)"
    parts = [_svg_open("chart-sensitivity", width, height, label),
             f'<text x="{left}" y="16" font-size="12">metric drop with only this layer quantized '
             f'(higher = more sensitive){scale_note}</text>']
    for i, (r, v) in enumerate(ranked):
        y = 30 + row_h * i
        name = str(r.get("layer", ""))
        short = name if len(name) <= 34 else "…" + name[-33:]
        parts.append(f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{_esc(short)}'
                     f'<title>{_esc(name)}</title></text>')
        if v is None:
            raw = r.get("sensitivity")
            text = NOT_MEASURED if raw in (None, NOT_MEASURED) or isinstance(raw, str) else _fmt(raw)
            parts.append(f'<text class="not-measured" x="{zero + 4:.1f}" y="{y + 14}" font-size="11" '
                         f'fill="#777" font-style="italic">{_esc(text)}</text>')
            continue
        w = max(abs(v) * scale, 1.0)  # a zero drop still gets a visible 1 px tick at 0
        x = zero - w if v < 0 else zero
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
                     f'fill="{COLORS["bar"]}"><title>{_esc(name)}: {v:.4g}</title></rect>'
                     f'<text x="{max(x + w, zero) + 6:.1f}" y="{y + 14}" font-size="11">{v:.4g}</text>')
    base = 30 + row_h * max(len(ranked), 1)
    parts.append(f'<line x1="{zero:.1f}" y1="26" x2="{zero:.1f}" y2="{base}" stroke="#444"/></svg>')
    return "".join(parts)


def _hist_panel(x0: float, kind: str, edges: list, counts: list, pw: int, ph: int, top: int) -> list[str]:
    """One histogram panel (bars as rects) at horizontal offset ``x0``."""
    titles = {"fp32": "FP32 input", "quant": "quantized input", "error": "error (quant − FP32)"}
    parts = [f'<text x="{x0 + pw / 2:.1f}" y="{top - 8}" font-size="12" text-anchor="middle">'
             f'{titles[kind]}</text>',
             f'<rect x="{x0:.1f}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    nums = [as_float(c) or 0.0 for c in counts]
    if len(edges) != len(nums) + 1 or not nums or max(nums) <= 0:
        parts.append(f'<text x="{x0 + pw / 2:.1f}" y="{top + ph / 2:.1f}" font-size="11" text-anchor="middle" '
                     f'fill="#777">no data</text>')
        return parts
    cmax, bw = max(nums), pw / len(nums)
    for i, c in enumerate(nums):
        if c > 0:
            h = max(ph * math.log1p(c) / math.log1p(cmax), 0.5)  # log scale: tails stay visible
            parts.append(f'<rect class="hist-{kind}" x="{x0 + i * bw:.2f}" y="{top + ph - h:.2f}" '
                         f'width="{max(bw, 0.5):.2f}" height="{h:.2f}" fill="{COLORS[kind]}"/>')
    lo, hi = as_float(edges[0]), as_float(edges[-1])
    parts.append(f'<text x="{x0:.1f}" y="{top + ph + 14}" font-size="10">{_fmt(lo)}</text>'
                 f'<text x="{x0 + pw:.1f}" y="{top + ph + 14}" font-size="10" text-anchor="end">{_fmt(hi)}</text>')
    return parts


def hist_chart(index: int, layer: str, hist: dict) -> str:
    """Three panels for one layer: FP32 histogram, quantized histogram, error histogram."""
    pw, ph, top, gap = 280, 150, 48, 30
    width, height = 3 * pw + 4 * gap, top + ph + 40
    label = f"Histograms of the input of layer {layer}: FP32, quantized, and error (quant − FP32); counts on a log scale"
    parts = [_svg_open(f"chart-hist-{index}", width, height, label),
             f'<text x="{gap}" y="18" font-size="13" font-weight="bold">{_esc(layer)}</text>'
             f'<text x="{width - gap}" y="18" font-size="11" text-anchor="end" fill="#555">bar height: '
             f'log(1 + count)</text>']
    edges = list(hist.get("edges") or [])
    err_edges = list(hist.get("error_edges") or edges)
    for k, (kind, e) in enumerate((("fp32", edges), ("quant", edges), ("error", err_edges))):
        parts += _hist_panel(gap + k * (pw + gap), kind, e, list(hist.get(kind) or []), pw, ph, top)
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict]) -> str:
    """The full per-layer table with the JSON keys; flagged rows highlighted."""
    keys = [k for k in TABLE_FIRST if any(k in r for r in rows)]
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("verdict", "fix_rule")]
    keys += ["verdict", "fix_rule"]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = []
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            if k in ("verdict", "fix_rule"):
                cells.append(f'<td class="text"><pre>{_esc(v) if v else ""}</pre></td>')
            else:
                cls = ' class="text"' if as_float(v) is None or isinstance(v, bool) else ""
                cells.append(f"<td{cls}>{_esc(_fmt(v))}</td>")
        flagged = ' class="flagged"' if r.get("flags") else ""
        body.append(f"<tr{flagged}>{''.join(cells)}</tr>")
    return f'<table id="layer-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _summary(analysis: dict) -> str:
    rows = analysis.get("rows") or []
    items = [f"{len(rows)} quantized layers", f"{sum(1 for r in rows if r.get('flags'))} flagged"]
    for key, text in (("metric_fp32_vs_quant", "metric FP32 vs quantized"), ("seconds", "analysis time (s)")):
        if as_float(analysis.get(key)) is not None:
            items.append(f"{text}: {_fmt(analysis[key])}")
    for key in ("model", "data", "recipe", "calibrator"):
        if analysis.get(key) is not None:
            items.append(f"{key}: {analysis[key]}")
    bad = analysis.get("first_nonfinite_layer")
    items.append(f"first layer with NaN/Inf output: {bad}" if bad else "no NaN/Inf in any layer output")
    return "<ul id=\"summary\">" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def render_analysis_html(analysis: dict, title: str, sections: tuple[str, ...] = ()) -> str:
    """ONE self-contained HTML page (inline SVG charts, no external resources) for an analysis dict.

    Args:
        analysis: ``AnalysisResult.to_json()`` (``rows``, ``histograms``, ``first_nonfinite_layer``, ...).
        title: page title (escaped).
        sections: more HTML sections (already escaped, e.g. ``report.engine_html.engine_section``), placed
            before the per-layer table.

    Returns:
        The HTML text.
    """
    rows = list(analysis.get("rows") or [])
    hists = dict(analysis.get("histograms") or {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_esc(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>",
             f"<h1>{_esc(title)}</h1>", '<div id="js-errors"></div>', _summary(analysis),
             "<h2>SQNR per layer (dB, higher is better)</h2>",
             '<p class="note">Isolated: only this layer quantized, fed FP32 inputs. Cumulative: the whole model '
             "quantized, measured at this layer's output. SQNR = 10·log10(signal power / noise power); "
             "∞ (identical output) is clipped to the top of the chart and marked.</p>", sqnr_chart(rows),
             "<h2>Sensitivity ranking</h2>",
             '<p class="note">Task metric lost when only this layer is quantized (higher is worse); '
             "layers the time budget did not reach are shown as “not measured”.</p>", sensitivity_chart(rows)]
    if hists:
        parts.append("<h2>Worst layers: input histograms</h2>")
        parts += [hist_chart(i, str(name), h) for i, (name, h) in enumerate(hists.items())]
    parts += list(sections)
    parts += ["<h2>All layers</h2>", '<p class="note">Flagged rows are highlighted; verdict and the pasteable '
              "recipe rule are in the last columns.</p>", _table(rows), "</body></html>"]
    log.debug("rendered analysis HTML: %d rows, %d histograms", len(rows), len(hists))
    return "\n".join(parts) + "\n"
