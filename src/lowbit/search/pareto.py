"""Pareto front and the search page: self-contained HTML with inline SVG (no network, no scripts).

* :func:`front` — indices of the non-dominated ``(size, metric)`` points: no other point is at most as
  large and at least as good, and strictly better in one of the two.
* :func:`scatter_svg` — points (x, y) with the front joined by a line and one point marked.
* :func:`search_html` — the page for a search section (``FallbackResult.to_json()`` or
  ``AllocationResult.to_json()``): the Pareto plot (size vs metric) or the fallback's metric against
  the number of float layers, and the tables behind them. Every text goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

COLORS = {"point": "#0072B2", "front": "#E69F00", "chosen": "#CC3311", "target": "#009E73"}
CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222;background:#fff}h1{font-size:1.4em}"
       "h2{font-size:1.15em;margin-top:1.5em}.note{color:#555;font-size:.9em;max-width:70em}"
       "svg{display:block;margin:.5em 0}svg text{font-family:sans-serif;fill:#222}"
       "table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}"
       "td.text,th{text-align:left}")


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the points ``(size, metric)`` no other point dominates (smaller-or-equal size, higher-or-equal
    metric, one of them strictly)."""
    out = set()
    for i, (x, y) in enumerate(points):
        dominated = any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            out.add(i)
    return out


def _ticks(lo: float, hi: float) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / 6
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = step * math.floor(lo / step)
    return [first + step * i for i in range(int(math.ceil((hi - first) / step)) + 1)]


def scatter_svg(points: Sequence[tuple[float, float]], *, chart_id: str, x_label: str, y_label: str,
                line: Sequence[int] = (), mark: int | None = None, hline: float | None = None,
                tips: Sequence[str] = ()) -> str:
    """An SVG scatter plot; ``line`` joins those points in x order, ``mark`` rings one, ``hline`` is a target."""
    width, height, left, right, top, bottom = 680, 400, 80, 20, 20, 340
    finite = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    xs, ys = [x for x, _ in finite] or [0.0, 1.0], [y for _, y in finite] + ([hline] if hline is not None else [])
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys or [0.0]), max(ys or [1.0]))
    sx = lambda x: left + (width - left - right) * (x - xt[0]) / (xt[-1] - xt[0])  # noqa: E731
    sy = lambda y: bottom - (bottom - top) * (y - yt[0]) / (yt[-1] - yt[0])  # noqa: E731
    label = f"{y_label} against {x_label}"
    parts = [f'<svg id="{_esc(chart_id)}" role="img" aria-label="{_esc(label)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{_esc(label)}</title>']
    for v in xt:
        parts.append(f'<line x1="{sx(v):.1f}" y1="{top}" x2="{sx(v):.1f}" y2="{bottom}" stroke="#eee"/>'
                     f'<text x="{sx(v):.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle">{v:g}</text>')
    for v in yt:
        parts.append(f'<line x1="{left}" y1="{sy(v):.1f}" x2="{width - right}" y2="{sy(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" font-size="11" text-anchor="end">{v:g}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}" stroke="#444"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#444"/>'
                 f'<text x="{(left + width) / 2:.0f}" y="{height - 22}" font-size="12" text-anchor="middle">'
                 f'{_esc(x_label)}</text><text x="18" y="{(top + bottom) / 2:.0f}" font-size="12" '
                 f'text-anchor="middle" transform="rotate(-90 18 {(top + bottom) / 2:.0f})">{_esc(y_label)}</text>')
    if hline is not None:
        parts.append(f'<line class="target" x1="{left}" y1="{sy(hline):.1f}" x2="{width - right}" y2="{sy(hline):.1f}" '
                     f'stroke="{COLORS["target"]}" stroke-dasharray="6 4"><title>target {hline:g}</title></line>')
    ok = [i for i in line if math.isfinite(points[i][0]) and math.isfinite(points[i][1])]
    if len(ok) > 1:
        pts = " ".join(f"{sx(points[i][0]):.1f},{sy(points[i][1]):.1f}" for i in sorted(ok, key=lambda i: points[i][0]))
        parts.append(f'<polyline class="front" points="{pts}" fill="none" stroke="{COLORS["front"]}" stroke-width="2"/>')
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        tip = tips[i] if i < len(tips) else f"{x:g}, {y:g}"
        parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{COLORS["point"]}">'
                     f'<title>{_esc(tip)}</title></circle>')
        if i == mark:
            parts.append(f'<circle class="chosen" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="9" fill="none" '
                         f'stroke="{COLORS["chosen"]}" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"<td>{v:.4g}</td>"
        if isinstance(v, (int, bool)) or v is None:
            return f"<td>{_esc('' if v is None else v)}</td>"
        text = ", ".join(f"{k}: {n}" for k, n in v.items()) if isinstance(v, dict) else (
            ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        return f'<td class="text">{_esc(text)}</td>'
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _allocation_body(sec: dict) -> list[str]:
    pts = sec.get("pareto") or []
    xy = [(float(p["size_mb"]), float(p["metric"])) for p in pts]
    tips = [f"{p['size_mb']:.4g} MB, {p['avg_bits']:.2f} avg bits: metric {p['metric']:.4f}" for p in pts]
    mark = next((i for i, p in enumerate(pts) if p.get("chosen")), None)
    return ["<h2>Pareto plot: size against metric</h2>",
            '<p class="note">Each point is an exact allocation for one budget, measured on the evaluation inputs. '
            "The line joins the non-dominated points; the ring marks the chosen allocation. Size counts packed "
            "weight bits (MB = 10<sup>6</sup> bytes).</p>",
            scatter_svg(xy, chart_id="chart-pareto", x_label="predicted size (MB)", y_label=sec.get("metric_name") or "metric",
                        line=[i for i, p in enumerate(pts) if p.get("on_front")], mark=mark, tips=tips),
            "<h2>Points</h2>", _table(pts, ["size_mb", "avg_bits", "bops_ratio", "metric", "agreement", "loss",
                                            "estimated_loss", "on_front", "chosen", "bits"]),
            "<h2>Chosen bits per layer</h2>",
            _table([{"layer": k, **v} for k, v in (sec.get("bits") or {}).items()], ["layer", "weight_bits", "act_bits"])]


def _fallback_body(sec: dict) -> list[str]:
    hist = sec.get("history") or []
    target = (sec.get("target") or {}).get("min_agreement")
    key = "agreement" if target is not None else "metric"
    xy = [(float(h["n_float"]), float(h[key])) for h in hist]
    tips = [f"{h['stage']}: {h['n_float']} float → {key} {h[key]:.4f}" for h in hist]
    chosen = set(sec.get("float_layers") or [])
    mark = next((i for i, h in enumerate(hist) if set(h["float_layers"]) == chosen), None)
    return ["<h2>Candidates: layers in float against the metric</h2>",
            f'<p class="note">{_esc(sec.get("message", ""))}. Every candidate scored by the search; the ring marks '
            "the chosen recipe, the dashed line the target.</p>",
            scatter_svg(xy, chart_id="chart-fallback", x_label="layers kept in float", y_label=key, mark=mark,
                        hline=target, tips=tips),
            "<h2>Layers kept in float</h2>", _table([{"layer": n} for n in sec.get("float_layers") or []], ["layer"]),
            "<h2>Ranking</h2>", _table(sec.get("ranking") or [], ["layer", "score", "measured"]),
            "<h2>History</h2>", _table(hist, ["stage", "n_float", "metric", "agreement", "loss", "met", "seconds"])]


def search_html(section: dict, title: str) -> str:
    """One self-contained HTML page for a search section (module doc)."""
    body = _allocation_body(section) if section.get("kind") == "bit_allocation" else _fallback_body(section)
    summary = {k: section.get(k) for k in ("met", "metric", "metric_fp32", "agreement", "predicted_size_mb",
                                            "avg_bits", "seconds", "engine") if k in section}
    items = "".join(f"<li>{_esc(k)}: {_esc(f'{v:.4g}' if isinstance(v, float) else v)}</li>" for k, v in summary.items())
    return "\n".join(["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>",
                      f'<ul id="summary">{items}</ul>', *body, "</body></html>"]) + "\n"
