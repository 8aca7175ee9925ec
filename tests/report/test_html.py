"""report.html: one self-contained page; escaping, non-finite SQNR, chart ids, 'not measured', and the
ONNX Runtime vs simulation section (report.engine_html)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from html.parser import HTMLParser

import pytest

from lowbit.cli.main import main
from lowbit.report.engine_html import engine_section, sqnr_gap
from lowbit.report.html import as_float, render_analysis_html


def _row(layer, iso, cum, sens=0.01, flags=(), verdict=None, fix=None, **extra):
    r = {"layer": layer, "type": "QuantConv2d", "sqnr_db_isolated": iso, "sqnr_db_cumulative": cum,
         "cosine_isolated": 0.999, "cosine_cumulative": 0.99, "mse_isolated": 1e-4, "kl": 0.01,
         "hist_overlap": 0.95, "clip_mse": 1e-6, "round_mse": 2e-5, "saturation_rate": 0.0,
         "sensitivity": sens, "flags": list(flags), "verdict": verdict, "fix_rule": fix}
    r.update(extra)
    return r


def fixture_analysis() -> dict:
    """A small analysis dict shaped like ``AnalysisResult.to_json()``: inf / nan as strings and floats."""
    rows = [
        _row("conv1", 41.0, 41.0, 0.0),
        _row("same", "inf", math.inf, "not measured"),
        _row("block.<b>&x", 12.5, 9.0, 0.2, ["low_sqnr"], "clipping (activations)",
             '- pattern: "block.<b>&x"\n  input: {calibrator: mse}'),
        _row("broken", "nan", float("nan"), "not measured", ["nonfinite"], "non-finite values",
             '- pattern: "broken"\n  float: true'),
        _row("fc", 35.0, 30.0, -0.01),
    ]
    hist = {"edges": [0, 1, 2, 3, 4], "fp32": [5, 10, 3, 0], "quant": [6, 9, 3, 0],
            "error": [1, 8, 1], "error_edges": [-0.1, -0.03, 0.03, 0.1]}
    return {"rows": rows, "histograms": {"block.<b>&x": hist, "fc": hist}, "first_nonfinite_layer": "broken",
            "seconds": 1.5, "metric_fp32_vs_quant": 0.97}


class _Tags(HTMLParser):
    """Every start tag with its attributes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(page)
    return p.tags


def _svg(page: str, chart_id: str) -> str:
    m = re.search(rf'<svg id="{re.escape(chart_id)}".*?</svg>', page, re.S)
    assert m, chart_id
    return m.group(0)


def test_self_contained_no_network():
    page = render_analysis_html(fixture_analysis(), "t")
    assert page.startswith("<!DOCTYPE html>")
    for tag, attrs in _tags(page):
        assert tag not in ("link", "img", "iframe", "object", "embed"), tag
        assert "src" not in attrs or tag not in ("script", "img"), attrs
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "@import" not in page and "url(" not in page


def test_chart_ids_roles_and_labels():
    page = render_analysis_html(fixture_analysis(), "t")
    svgs = {a["id"]: a for t, a in _tags(page) if t == "svg"}
    assert set(svgs) == {"chart-sqnr", "chart-sensitivity", "chart-hist-0", "chart-hist-1"}
    for attrs in svgs.values():
        assert attrs["role"] == "img" and attrs["aria-label"]
    assert "higher is better" in svgs["chart-sqnr"]["aria-label"]
    sqnr = _svg(page, "chart-sqnr")
    assert 'class="series-isolated"' in sqnr and 'class="series-cumulative"' in sqnr
    assert "layer (execution order)" in sqnr and "SQNR (dB)" in sqnr
    assert "isolated (this layer alone quantized)" in sqnr  # legend


def test_text_is_escaped():
    data = fixture_analysis()
    page = render_analysis_html(data, 'title <script>alert("x")</script>')
    assert "<script>alert" not in page
    assert "title &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "block.<b>" not in page and "block.&lt;b&gt;&amp;x" in page
    assert all(t != "b" for t, _ in _tags(page))


def test_inf_and_nan_sqnr_are_clipped_and_marked():
    page = render_analysis_html(fixture_analysis(), "t")
    sqnr = _svg(page, "chart-sqnr")
    assert sqnr.count('class="nonfinite"') == 4  # inf + nan, both series
    assert "∞" in sqnr and "NaN" in sqnr
    m = re.search(r'viewBox="0 0 (\d+) (\d+)"', sqnr)
    height = int(m.group(2))
    for pts in re.findall(r'points="([^"]+)"', sqnr):
        for pair in pts.split():
            x, y = (float(v) for v in pair.split(","))
            assert math.isfinite(x) and 0 <= y <= height
    assert "nan" not in re.sub(r"NaN", "", sqnr).lower().replace("nan,", "")  # no NaN coordinates
    assert "inf" not in sqnr.lower().replace("info", "")


def test_all_inf_still_renders():
    data = {"rows": [_row("a", "inf", "inf"), _row("b", math.inf, math.inf)], "histograms": {}}
    page = render_analysis_html(data, "t")
    assert _svg(page, "chart-sqnr").count('class="nonfinite"') == 4
    assert "chart-hist-0" not in page


def test_not_measured_shown_and_ranked_last():
    page = render_analysis_html(fixture_analysis(), "t")
    sens = _svg(page, "chart-sensitivity")
    assert sens.count("not measured") >= 2
    order = [n for n in re.findall(r">([^<>]+)<title>", sens)]
    assert order[:3] == ["block.&lt;b&gt;&amp;x", "conv1", "fc"]  # 0.2, 0.0, -0.01
    assert set(order[3:]) == {"same", "broken"}
    widths = [float(w) for w in re.findall(r'class="bar"[^>]*width="([0-9.]+)"', sens)]
    assert len(widths) == 3 and all(w > 0 for w in widths)


def test_histograms_have_three_panels_with_bars():
    page = render_analysis_html(fixture_analysis(), "t")
    h = _svg(page, "chart-hist-0")
    for kind in ("fp32", "quant", "error"):
        assert f'class="hist-{kind}"' in h
    assert "FP32 input" in h and "quantized input" in h and "error (quant − FP32)" in h
    assert h.count('class="hist-fp32"') == 3  # zero bins are not drawn


def test_table_has_keys_flagged_rows_and_pre():
    page = render_analysis_html(fixture_analysis(), "t")
    table = page[page.index('<table id="layer-table"'):]
    for key in ("layer", "sqnr_db_isolated", "sqnr_db_cumulative", "kl", "hist_overlap", "sensitivity",
                "flags", "verdict", "fix_rule"):
        assert f"<th>{key}</th>" in table
    assert table.count('<tr class="flagged">') == 2
    assert "<pre>- pattern: &quot;block.&lt;b&gt;&amp;x&quot;\n  input: {calibrator: mse}</pre>" in table
    assert page.index("chart-sqnr") < page.index("chart-sensitivity") < page.index("layer-table")


def test_error_catcher_and_empty_analysis():
    page = render_analysis_html({"rows": [], "histograms": {}}, "empty")
    assert '<div id="js-errors"></div>' in page and "window.onerror" in page
    assert 'id="chart-sqnr"' in page and 'id="chart-sensitivity"' in page


def test_as_float():
    assert as_float("inf") == math.inf and as_float("-inf") == -math.inf and math.isnan(as_float("nan"))
    assert as_float(3) == 3.0 and as_float("not measured") is None and as_float(None) is None
    assert as_float(True) is None


# ---------------------------------------------------------------- ONNX Runtime vs simulation section

def _engine_row(tensor, eng, sim, consumer="Conv /c/Conv", quantizer="c.input_quantizer", **extra):
    r = {"tensor": tensor, "consumer": consumer, "sqnr_db": eng, "cosine": 0.99, "mse": 1e-4,
         "saturation_rate": 0.001, "nonfinite": False, "elements": 100, "quantizer": quantizer,
         "sim_sqnr_db": sim, "sim_cosine": 0.99, "sim_mse": 1e-4}
    r.update(extra)
    return r


def fixture_engine() -> dict:
    """Shaped like ``analysis_onnxruntime.json``: non-finite values as strings, markup in a name, an output row."""
    rows = [_engine_row("input", 50.0, 50.0),
            _engine_row("/a<b>&/Relu_output_0", 30.0, 33.5),
            _engine_row("/c/Conv_output_0", "inf", "inf"),
            _engine_row("/d/Conv_output_0", "nan", 20.0),
            _engine_row("/e/Add_output_0", 25.0, 24.0),
            _engine_row("output", 28.0, 28.001, consumer="graph output", quantizer=None, saturation_rate=None)]
    return {"engine": "onnxruntime", "rows": rows, "first_nonfinite_tensor": "/d/Conv_output_0", "samples": 48,
            "simulation_matched": True}


def _engine_page() -> str:
    return render_analysis_html(fixture_analysis(), "t", (engine_section(fixture_engine()),))


def test_engine_section_chart_table_and_order():
    page = _engine_page()
    svgs = {a["id"]: a for t, a in _tags(page) if t == "svg"}
    assert set(svgs) == {"chart-sqnr", "chart-sensitivity", "chart-hist-0", "chart-hist-1", "chart-engine"}
    assert svgs["chart-engine"]["role"] == "img" and "ONNX Runtime" in svgs["chart-engine"]["aria-label"]
    chart = _svg(page, "chart-engine")
    assert 'class="series-engine"' in chart and 'class="series-simulation"' in chart
    assert "quantized tensor (graph order)" in chart and "simulation (PyTorch, same tensor)" in chart
    assert chart.count('class="nonfinite"') == 3  # inf in both series, NaN in the engine's
    assert "ONNX Runtime (deployed engine) vs simulation" in page
    assert page.index("chart-hist-1") < page.index("chart-engine") < page.index("engine-table") < page.index(
        "layer-table")
    table = page[page.index('<table id="engine-table"'):page.index("</table>", page.index('id="engine-table"'))]
    assert table.count("<tr") == len(fixture_engine()["rows"]) + 1
    for head in ("ONNX Runtime SQNR dB", "simulation SQNR dB", "gap dB", "quantizer (simulation)"):
        assert f"<th>{head}</th>" in table


def test_engine_gap_is_engine_minus_simulation_and_worst_row_flagged():
    rows = fixture_engine()["rows"]
    assert [sqnr_gap(r) for r in rows] == [0.0, -3.5, None, None, 1.0, pytest.approx(-0.001)]
    page = _engine_page()
    table = page[page.index('<table id="engine-table"'):]
    flagged = re.findall(r'<tr class="flagged">(.*?)</tr>', table[:table.index("</table>")])
    assert len(flagged) == 1 and "/a&lt;b&gt;&amp;/Relu_output_0" in flagged[0] and "-3.5" in flagged[0]
    summary = page[page.index('<ul id="engine-summary">'):]
    assert "largest engine-below-simulation gap: -3.50 dB at /a&lt;b&gt;&amp;/Relu_output_0" in summary
    assert "first tensor with NaN/Inf in ONNX Runtime: /d/Conv_output_0" in summary


def test_engine_section_escapes_and_stays_self_contained():
    page = _engine_page()
    assert "<b>&" not in page and all(t != "b" for t, _ in _tags(page))
    for tag, attrs in _tags(page):
        assert tag not in ("link", "img", "iframe", "object", "embed"), tag
    assert "https://" not in page and "url(" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_engine_section_without_simulation_figures():
    engine = fixture_engine()
    engine["simulation_matched"] = False
    for r in engine["rows"]:
        for key in ("quantizer", "sim_sqnr_db", "sim_cosine", "sim_mse"):
            r.pop(key)
    section = engine_section(engine)
    assert "simulation figures missing" in section and "gap:" not in section
    assert 'class="series-simulation"' not in section and 'class="series-engine"' in section
    assert 'class="flagged"' not in section


@pytest.mark.slow
def test_cli_engine_page_shows_onnxruntime_next_to_simulation(tmp_path):
    """Real run on digits-cnn: the engine section is in analysis.html and, with the engine's integer
    arithmetic emulated, ONNX Runtime and the simulation agree on every tensor within 0.01 dB."""
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["analyze", "--model", "digits-cnn", "--data", "digits", "--out", str(out), "--budget-seconds", "0",
                   "--n-calib", "32", "--n-eval", "48", "--engine", "onnxruntime"])
    assert rc == 0
    engine = json.loads((out / "analysis_onnxruntime.json").read_text())
    analysis = json.loads((out / "analysis.json").read_text())
    assert engine["simulation_matched"] is True
    own = {q for r in analysis["rows"] for q in r.get("input_quantizers", [])}
    rows = engine["rows"]
    assert [r["quantizer"] for r in rows[:-1]] and {r["quantizer"] for r in rows[:-1]} <= own
    assert rows[-1]["consumer"] == "graph output" and rows[-1]["quantizer"] is None
    assert all(abs(sqnr_gap(r)) < 0.01 for r in rows), [(r["tensor"], sqnr_gap(r)) for r in rows]
    page = (out / "analysis.html").read_text()
    assert 'id="chart-engine"' in page and page.count('class="series-engine"') == 1
    table = page[page.index('<table id="engine-table"'):]
    assert table[:table.index("</table>")].count("<tr") == len(rows) + 1
