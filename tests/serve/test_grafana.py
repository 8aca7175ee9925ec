"""``deploy/grafana/lowbit.json`` is a dashboard Grafana loads as is, and it plots metrics the server exports.

The schema below follows Grafana's dashboard JSON model (schema version 39: the dashboard kind's top-level keys,
required ``schemaVersion`` / ``templating`` / ``annotations``, panels with a plugin ``type``, a 24-column
``gridPos``, Prometheus targets with ``refId`` and ``expr``, row panels, template variables), written for this
test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np

from lowbit.serve.fuse import Fuse
from lowbit.serve.metrics import ServeMetrics
from lowbit.serve.shadow import output_divergence

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lowbit.json"

DATASOURCE_REF = {"type": "object", "additionalProperties": False,
                  "properties": {"type": {"type": "string"}, "uid": {"type": "string"}}}
GRID_POS = {"type": "object", "additionalProperties": False, "required": ["h", "w", "x", "y"],
            "properties": {"h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                           "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0},
                           "static": {"type": "boolean"}}}
PROM_TARGET = {"type": "object", "required": ["refId", "expr"],
               "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"}, "expr": {"type": "string", "minLength": 1},
                              "legendFormat": {"type": "string"}, "datasource": DATASOURCE_REF,
                              "format": {"enum": ["time_series", "table", "heatmap"]},
                              "instant": {"type": "boolean"}, "range": {"type": "boolean"}}}
PANEL = {"type": "object", "additionalProperties": False, "required": ["type", "id", "title", "gridPos", "targets"],
         "properties": {"type": {"enum": ["timeseries", "stat", "heatmap", "gauge", "table", "bargauge", "text"]},
                        "id": {"type": "integer"}, "title": {"type": "string"}, "description": {"type": "string"},
                        "datasource": DATASOURCE_REF, "gridPos": GRID_POS,
                        "targets": {"type": "array", "minItems": 1, "items": PROM_TARGET},
                        "fieldConfig": {"type": "object", "additionalProperties": False, "required": ["defaults", "overrides"],
                                        "properties": {"defaults": {"type": "object"},
                                                       "overrides": {"type": "array"}}},
                        "options": {"type": "object"}, "pluginVersion": {"type": "string"},
                        "transparent": {"type": "boolean"}}}
ROW = {"type": "object", "additionalProperties": False, "required": ["type", "id", "collapsed", "gridPos", "panels"],
       "properties": {"type": {"const": "row"}, "id": {"type": "integer"}, "title": {"type": "string"},
                      "collapsed": {"type": "boolean"}, "gridPos": GRID_POS, "panels": {"type": "array"},
                      "datasource": DATASOURCE_REF}}
VARIABLE = {"type": "object", "required": ["type", "name"],
            "properties": {"type": {"enum": ["query", "adhoc", "constant", "datasource", "interval", "textbox",
                                             "custom", "system"]},
                           "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                           "hide": {"enum": [0, 1, 2]}, "refresh": {"enum": [0, 1, 2]}, "sort": {"enum": list(range(9))},
                           "current": {"type": "object", "required": ["text", "value"]},
                           "datasource": DATASOURCE_REF, "multi": {"type": "boolean"}, "includeAll": {"type": "boolean"}}}
SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "additionalProperties": False,
    "required": ["schemaVersion", "templating", "annotations", "title", "uid", "panels"],
    "properties": {
        "id": {"type": ["integer", "null"]}, "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}}, "timezone": {"type": "string"},
        "editable": {"type": "boolean"}, "graphTooltip": {"enum": [0, 1, 2]},
        "time": {"type": "object", "additionalProperties": False, "required": ["from", "to"],
                 "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "timepicker": {"type": "object"}, "refresh": {"anyOf": [{"type": "string"}, {"const": False}]},
        "schemaVersion": {"type": "integer", "minimum": 36}, "version": {"type": "integer"},
        "fiscalYearStartMonth": {"type": "integer", "minimum": 0, "maximum": 11}, "liveNow": {"type": "boolean"},
        "weekStart": {"type": "string"}, "links": {"type": "array"},
        "annotations": {"type": "object", "additionalProperties": False, "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "datasource", "enable", "iconColor"]}}}},
        "templating": {"type": "object", "additionalProperties": False,
                       "properties": {"list": {"type": "array", "items": VARIABLE}}},
        "panels": {"type": "array", "minItems": 1, "items": {"anyOf": [PANEL, ROW]}},
    },
}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_matches_grafana_schema_and_layout():
    dash = _dashboard()
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(dash, SCHEMA)
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    types = {p["type"] for p in panels}
    assert {"heatmap", "timeseries", "stat"} <= types
    heatmap = next(p for p in panels if p["type"] == "heatmap")
    assert "lowbit_quantization_error" in heatmap["targets"][0]["expr"] and "{{layer}}" in heatmap["targets"][0]["legendFormat"]


def test_dashboard_queries_use_defined_variables_and_exported_metrics():
    dash = _dashboard()
    text = json.dumps(dash)
    defined = {v["name"] for v in dash["templating"]["list"]}
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)) - {"__rate_interval", "__range", "__all"}
    assert used <= defined, used - defined

    metrics = ServeMetrics()  # every metric observed once, then read back as the server would expose it
    metrics.set_version("v1")
    metrics.latency.labels(model="int8").observe(0.01)
    metrics.requests.labels(model="int8").inc()
    metrics.rejected.labels(reason="wrong_shape").inc()
    metrics.recalibrations.labels(result="accepted").inc()
    div = output_divergence(np.array([[1.0, 2.0]]), np.array([[1.1, 2.0]]))
    metrics.observe_shadow(div, False, {"conv1": (0.01, 40.0)})
    fuse = Fuse(1, 1)
    metrics.observe_fuse(fuse.state(), fuse.record(True))
    exposed = set(re.findall(r"^(lowbit_[a-z0-9_]+)", metrics.render()[0].decode(), flags=re.M))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    referenced = {m for e in exprs for m in re.findall(r"\b(lowbit_[a-z0-9_]+)", e)}
    assert len(referenced) >= 15 and referenced <= exposed, referenced - exposed
    for e in exprs:
        assert e.count("(") == e.count(")") and e.count("[") == e.count("]") and e.count("{") == e.count("}"), e
