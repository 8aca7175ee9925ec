"""Markdown tables from ``bench/results/*.json`` (the tables in bench/RESULTS.md are pasted from this).

Usage: ``.venv/bin/python bench/tables.py [calibration|ptq|zoo ...]`` (default: both full-run files).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _f(v, fmt: str) -> str:
    if v is None:
        return "–"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def calibration_table(rows: list[dict]) -> str:
    out = ["| tool | calibrator | images | seconds | forward s | stats s | peak RSS MiB | baseline RSS MiB | tensors |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['tool']} | {r['calibrator']} | {r['images']} | error: {r['error']} | | | | | |")
            continue
        out.append(
            f"| {r['tool']} | {r['calibrator']} | {r['images']} | {_f(r['seconds'], '.2f')} | "
            f"{_f(r.get('forward_seconds'), '.2f')} | {_f(r.get('stats_seconds'), '.2f')} | "
            f"{_f(r['peak_rss_mb'], '.0f')} | {_f(r.get('baseline_rss_mb'), '.0f')} | {r['tensors']} |"
        )
    return "\n".join(out)


def _label(r: dict) -> str:
    if r["tool"] == "lowbit":
        return f"lowbit {r.get('recipe')} / {r.get('calibrator')}"
    if r["tool"] == "onnxruntime":
        return f"ORT {r.get('calibrator')}" + (" reduce_range" if r.get("reduce_range") else "")
    return r["tool"]


def ptq_table(rows: list[dict], model: str) -> str:
    out = [f"**{model}** ({rows[0].get('calib_samples')} calibration / {rows[0].get('eval_samples')} evaluation "
           f"samples; metric: {next((r['metric_name'] for r in rows if r.get('metric_name')), '')})", "",
           "| config | metric | top-1 agree | mean KL | b1 ms | b32 ms | size MB | calib s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {_label(r)} | error: {r['error']} | | | | | | |")
            continue
        out.append(
            f"| {_label(r)} | {_f(r['metric'], '.4f')} | {_f(r['top1_agreement'], '.4f')} | {_f(r['kl'], '.4f')} | "
            f"{_f(r['latency_ms_b1'], '.2f')} | {_f(r['latency_ms_b32'], '.1f')} | "
            f"{_f(r['size_bytes'] / 1e6 if r.get('size_bytes') else None, '.2f')} | {_f(r['calib_seconds'], '.1f')} |"
        )
    return "\n".join(out)


def recovery_table(rows: list[dict], model: str) -> str:
    first = rows[0]
    out = [f"**{model}** ({first.get('calib_samples')} calibration samples, passes see {first.get('pass_samples')}; "
           f"{first.get('eval_samples')} evaluation samples)", "",
           "| config | passes | metric | top-1 agree | mean KL | float layers | size MB | seconds |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = r["size_bytes"] / 1e6 if r.get("size_bytes") else None
        config = r["config"].split(" QDQ,")[0] + (" (best ORT row)" if " QDQ," in r["config"] else "")
        out.append(f"| {config} | {r['passes']} | {_f(r['metric'], '.4f')} | {_f(r['top1_agreement'], '.4f')} | "
                   f"{_f(r['kl'], '.4f')} | {r.get('float_layers', 0)} | {_f(size, '.2f')} | {_f(r['seconds'], '.0f')} |")
    return "\n".join(out)


def zoo_table(rows: list[dict]) -> str:
    """One line per model of ``bench/zoo.py``: integer kernels, latency FP32 / lowbit / ORT, accuracy, parity."""
    out = ["| model | heavy ops | int kernels lowbit | int kernels ORT | b1 ms FP32 / lowbit / ORT | "
           "b32 ms FP32 / lowbit / ORT | SQNR dB | cosine | top-1 agree | parity | float reported |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['model']} | error: {r['error']} | | | | | | | | | |")
            continue
        b1 = " / ".join(_f(r[f"latency_ms_b1_{k}"], ".3g") for k in ("fp32", "lowbit", "ort"))
        b32 = " / ".join(_f(r[f"latency_ms_b32_{k}"], ".4g") for k in ("fp32", "lowbit", "ort"))
        out.append(f"| {r['model']} | {r['heavy_ops']} | {r['int_kernels_lowbit']} | {_f(r['int_kernels_ort'], 'd')} | "
                   f"{b1} | {b32} | {_f(r['sqnr_db'], '.1f')} | {_f(r['cosine'], '.4f')} | "
                   f"{_f(r['top1_agreement'], '.3f')} | {'ok' if r['parity_ok'] else 'FAIL'} | "
                   f"{r['float_ops_reported']} |")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    names = argv or ["calibration", "ptq"]
    for name in names:
        rows = json.loads((RESULTS / f"{name}.json").read_text())
        print(f"## {name} ({rows[0]['machine']}, {rows[0]['date']}, lowbit {rows[0]['lowbit_version']})\n")
        if name.startswith("zoo"):
            print(zoo_table(rows) + "\n")
        elif name.startswith("calibration"):
            print(calibration_table(rows) + "\n")
        elif name.startswith("recovery"):
            for model in dict.fromkeys(r["model"] for r in rows):
                print(recovery_table([r for r in rows if r["model"] == model], model) + "\n")
        else:
            for model in dict.fromkeys(r["model"] for r in rows):
                print(ptq_table([r for r in rows if r["model"] == model], model) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
