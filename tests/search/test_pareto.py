"""Pareto front against its definition (hypothesis), and the search page: well-formed, escaped, offline."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.search.pareto import front, scatter_svg, search_html

SVG = "{http://www.w3.org/2000/svg}"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12))
def test_front_is_exactly_the_non_dominated_points(points):
    got = front(points)
    for i, p in enumerate(points):
        beaten = [q for q in points if q[0] <= p[0] and q[1] >= p[1] and q != p]
        assert (i in got) == (not beaten)


def test_scatter_svg_parses_and_draws_each_point_front_and_mark():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (4.0, float("nan"))]
    svg = scatter_svg(pts, chart_id="c", x_label="size <MB>", y_label="metric", line=[0, 1], mark=1, hline=0.85)
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG}circle[@class='point']")) == 3  # the NaN point is skipped
    assert len(root.findall(f".//{SVG}circle[@class='chosen']")) == 1
    assert len(root.findall(f".//{SVG}polyline[@class='front']")) == 1
    assert root.find(f".//{SVG}line[@class='target']") is not None
    assert "size &lt;MB&gt;" in svg


def _allocation():
    return {"kind": "bit_allocation", "metric": 0.98, "predicted_size_mb": 0.01, "bits": {"conv<1>": {"weight_bits": 4, "act_bits": 8}},
            "pareto": [{"size_mb": 0.01, "avg_bits": 4.0, "bops_ratio": 0.5, "metric": 0.98, "agreement": 0.99, "loss": 0.1,
                        "estimated_loss": 0.2, "on_front": True, "chosen": True, "bits": {"w4a8": 1}}]}


def test_search_pages_are_self_contained_and_escape_names():
    fb = {"kind": "fallback", "message": "target <x> met", "target": {"min_agreement": 0.99}, "float_layers": ["a<b>"],
          "ranking": [{"layer": "a<b>", "score": 0.5, "measured": True}],
          "history": [{"stage": "base", "n_float": 0, "float_layers": [], "metric": 0.9, "agreement": 0.9, "loss": 1.0,
                       "met": False, "seconds": 0.1},
                      {"stage": "prefix", "n_float": 1, "float_layers": ["a<b>"], "metric": 1.0, "agreement": 1.0,
                       "loss": 0.0, "met": True, "seconds": 0.2}]}
    for section, chart in ((fb, "chart-fallback"), (_allocation(), "chart-pareto")):
        page = search_html(section, "t & <title>")
        assert f'id="{chart}"' in page and "<b>" not in page and "<x>" not in page
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "<script" not in page
        start = page.index(f'<svg id="{chart}"')
        ET.fromstring(page[start:page.index("</svg>", start) + 6])
