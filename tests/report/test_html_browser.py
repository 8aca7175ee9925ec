"""analysis.html in a REAL headless browser (Debian's chromium): charts drawn, screenshot not blank, no JS errors.

The page comes from a real ``lowbit analyze`` run on digits-cnn (when ``lowbit.analysis.analyze`` exists),
and from a fixed dict with inf / NaN SQNR and "not measured" layers. Without chromium the tests skip
locally and FAIL in CI (``CI=true``): ``.ci/run`` installs it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.cli.main import main
from lowbit.report.html import render_analysis_html

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]
SERIES_RGB = {"isolated": (0x00, 0x72, 0xB2), "cumulative": (0xE6, 0x9F, 0x00)}

pytestmark = pytest.mark.slow


def chromium() -> str:
    """Path of the chromium binary; skip locally, fail in CI, when there is none."""
    path = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if path is None:
        msg = "chromium is not installed (apt-get install chromium; .ci/run does it)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless chromium run on ``page`` with a fresh profile under ``tmp``."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def console_problems(stderr: str) -> list[str]:
    """Chromium's log lines about page scripts (our page writes nothing to the console)."""
    return [ln for ln in stderr.splitlines() if "Uncaught" in ln or "ERROR:CONSOLE" in ln or ":CONSOLE" in ln]


class DomShapes(HTMLParser):
    """Per svg id: polylines' points, rects' (width, height), marks; and the js-errors element's text."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, dict[str, list]] = {}
        self.current: str | None = None
        self.in_errors = False
        self.errors_text = ""
        self.body_attrs: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body_attrs = a
        if tag == "div" and a.get("id") == "js-errors":
            self.in_errors = True
        if tag == "svg":
            self.current = a.get("id")
            self.svgs[self.current] = {"polyline": [], "rect": [], "nonfinite": [], "role": a.get("role")}
        elif self.current is not None and tag == "polyline":
            pts = [tuple(float(v) for v in p.split(",")) for p in a.get("points", "").split()]
            self.svgs[self.current]["polyline"].append(pts)
        elif self.current is not None and tag == "rect":
            self.svgs[self.current]["rect"].append((float(a.get("width", 0)), float(a.get("height", 0)), a.get("class")))
        elif self.current is not None and tag == "path" and a.get("class") == "nonfinite":
            self.svgs[self.current]["nonfinite"].append(a)

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None
        if tag == "div":
            self.in_errors = False

    def handle_data(self, data):
        if self.in_errors:
            self.errors_text += data


def fixture_analysis() -> dict:
    """Edge cases: inf / NaN SQNR (float and string), 'not measured', markup in a layer name."""
    def row(name, iso, cum, sens, flags=()):
        return {"layer": name, "type": "QuantConv2d", "sqnr_db_isolated": iso, "sqnr_db_cumulative": cum,
                "sensitivity": sens, "flags": list(flags), "verdict": "rounding" if flags else None,
                "fix_rule": f'- pattern: "{name}"\n  float: true' if flags else None}
    rows = [row("conv1", 40.0, 40.0, 0.0), row("same", "inf", math.inf, "not measured"),
            row("<b>x</b>", 15.0, 11.0, 0.3, ["low_sqnr"]), row("broken", "nan", "nan", 0.1, ["nonfinite"]),
            row("fc", 33.0, 28.0, 0.02)]
    hist = {"edges": [i / 4 for i in range(17)], "fp32": [1, 4, 9, 16, 25, 16, 9, 4, 1, 0, 0, 1, 0, 0, 0, 0],
            "quant": [0, 5, 0, 16, 34, 0, 13, 0, 1, 0, 0, 1, 0, 0, 0, 0], "error": [1, 3, 20, 3, 1],
            "error_edges": [-0.1, -0.06, -0.02, 0.02, 0.06, 0.1]}
    return {"rows": rows, "histograms": {"<b>x</b>": hist}, "first_nonfinite_layer": "broken", "seconds": 0.5}


def analysis_html_from_cli(out: Path) -> Path:
    """``lowbit analyze`` on digits-cnn."""
    rc = main(["analyze", "--model", "digits-cnn", "--data", "digits", "--out", str(out),
               "--budget-seconds", "3", "--n-calib", "64"])
    assert rc == 0
    return out / "analysis.html"


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    chromium()  # skip / fail before the expensive part
    root = tmp_path_factory.mktemp("browser")
    edge = root / "edge.html"
    edge.write_text(render_analysis_html(fixture_analysis(), "edge cases <inf & nan>"), encoding="utf-8")
    return {"digits": analysis_html_from_cli(root / "digits"), "edge": edge}


def _check_dom(dom: str, n_rows: int) -> DomShapes:
    shapes = DomShapes()
    shapes.feed(dom)
    assert shapes.body_attrs.get("data-rendered") == "1", "the page's script did not run"
    assert shapes.errors_text.strip() == "", shapes.errors_text
    svgs = shapes.svgs
    assert {"chart-sqnr", "chart-sensitivity", "chart-hist-0"} <= set(svgs)
    assert all(s["role"] == "img" for s in svgs.values())
    lines = svgs["chart-sqnr"]["polyline"]
    assert len(lines) >= 2
    for pts in lines:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        assert max(xs) - min(xs) > 10 and all(math.isfinite(v) for v in xs + ys)
    bars = [r for r in svgs["chart-sensitivity"]["rect"] if r[2] == "bar"]
    assert bars and all(w > 0 and h > 0 for w, h, _ in bars)
    for chart_id in (k for k in svgs if k.startswith("chart-hist-")):
        for kind in ("hist-fp32", "hist-quant", "hist-error"):
            drawn = [r for r in svgs[chart_id]["rect"] if r[2] == kind]
            assert drawn and all(w > 0 and h > 0 for w, h, _ in drawn), (chart_id, kind)
    assert dom.count("<tr") == n_rows + 1
    return shapes


@pytest.mark.parametrize("name", ["digits", "edge"])
def test_dom_has_drawn_charts_and_no_errors(pages, tmp_path, name):
    proc = run_chromium(pages[name], tmp_path, "--dump-dom")
    n_rows = 5 if name == "edge" else len(re.findall(r"<tr", pages[name].read_text())) - 1
    shapes = _check_dom(proc.stdout, n_rows)
    assert console_problems(proc.stderr) == []
    if name == "edge":
        assert len(shapes.svgs["chart-sqnr"]["nonfinite"]) == 4  # inf and NaN, both series
        assert "not measured" in proc.stdout and "&lt;b&gt;x&lt;/b&gt;" in proc.stdout


@pytest.mark.parametrize("name", ["digits", "edge"])
def test_screenshot_is_not_blank(pages, tmp_path, name):
    png = tmp_path / f"analysis-{name}.png"
    proc = run_chromium(pages[name], tmp_path, f"--screenshot={png}", "--window-size=1200,2000")
    assert console_problems(proc.stderr) == []
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 2000)
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    non_white = int((pixels.min(axis=1) < 235).sum())
    assert non_white > 0.01 * len(pixels), non_white
    for series, rgb in SERIES_RGB.items():  # both SQNR lines (and the histograms) are painted
        hits = int((np.abs(pixels - np.array(rgb)).max(axis=1) <= 12).sum())
        assert hits > 200, (series, hits)
    keep = os.environ.get("LOWBIT_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)


def test_harness_catches_a_script_error(tmp_path):
    """Negative control: a page whose script throws is caught both in the DOM and in chromium's log."""
    page = tmp_path / "bad.html"
    good = render_analysis_html(fixture_analysis(), "bad")
    page.write_text(good.replace("</body>", "<script>undefined_function_x();</script></body>"), encoding="utf-8")
    proc = run_chromium(page, tmp_path, "--dump-dom")
    with pytest.raises(AssertionError):
        _check_dom(proc.stdout, 5)
    assert any("undefined_function_x" in ln for ln in console_problems(proc.stderr))


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_fails_in_ci_skips_locally(monkeypatch, ci, outcome):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        chromium()
