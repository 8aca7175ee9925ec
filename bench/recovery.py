"""Accuracy recovery: round-to-nearest vs CLE, bias correction, AdaRound, GPTQ and the float fallback, in one run.

Same model, same calibration batches and same evaluation inputs for every row; every lowbit row is exported
with ``lowbit.export_onnx`` and its figures come from ONNX Runtime running that file (as does the anchor).

* efficientnet-lite0 on ``photos`` (64 calibration views, 256 evaluation views; metric: top-1 agreement with
  the FP32 ONNX): W8A8 (recipe ``int8``: uint8 asymmetric percentile activations, symmetric per-channel weights,
  7-bit on CPUs without VNNI, see ``lowbit.transforms.recipe.machine_weight_bits``) as RTN, +CLE, +bias correction, +CLE+bias correction,
  +AdaRound(+bias correction), +GPTQ(+bias correction); the fallback search to agreement >= 0.99; W4A8 as
  RTN / AdaRound / GPTQ.
* digits-cnn on ``digits`` (metric: test accuracy): W4A8 and W2A8 with RTN / AdaRound / GPTQ, every layer at that
  width, and W2A8 with the first and last layer at 8 bits (the usual protocol for 2-bit weights).
* anchor: ONNX Runtime ``quantize_static`` (QDQ, per-channel, the best of MinMax / Entropy / Percentile, with and
  without reduce_range) on the same FP32 ONNX and batches (``bench/ptq.py``'s code).

Passes see ``PASS_BATCHES`` calibration batches; calibration itself sees all. ``seconds`` is the wall time of
quantization (prepare, passes, calibration; the search's own time for the fallback row), without export.

Usage: ``.venv/bin/python bench/recovery.py [--quick] [--models NAME ...]``; writes ``bench/results/recovery.json``
(``recovery_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/RESULTS.md: spin-waiting threads on a busy machine

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from _common import export_fp32_onnx, stamp, write_results  # noqa: E402
from ptq import THREADS, Evaluator, load, run_ort  # noqa: E402

PASS_BATCHES = 2
KEYS = ("model", "config", "passes", "metric", "top1_agreement", "kl", "float_layers", "size_bytes", "seconds")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def with_weight_bits(recipe, bits: int, *patterns_at_8: str):
    """``recipe`` with ``bits``-bit weights everywhere, except layers matching ``patterns_at_8`` (8-bit weights)."""
    import lowbit

    base = recipe.default_weight
    out = replace(recipe, default_weight=replace(base, bits=bits))
    rules = [lowbit.LayerRule(p, base, recipe.default_input) for p in patterns_at_8]
    return out.with_rules(*rules) if rules else out


def float_rule_count(qmodel) -> int:
    info = getattr(qmodel, "lowbit_info", None)
    return sum(1 for _, why in (info.float_layers if info else []) if "recipe rule" in why)


def lowbit_row(zm, calib, ev: Evaluator, tmp: Path, config: str, recipe, pass_batches: int) -> dict:
    import lowbit
    from lowbit.ptq.passes import ordered, quantize

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    q = quantize(zm.model, calib, recipe, zm.example_input, show_progress=False,
                 pass_batches=pass_batches, timings=timings)
    seconds = time.perf_counter() - t0
    path = tmp / f"{zm.name}_{abs(hash((config, recipe.passes)))}.onnx"
    lowbit.export_onnx(q, zm.example_input, path, target=recipe.target, check_parity=False)
    row = {"tool": "lowbit", "config": config, "passes": "+".join(ordered(recipe.passes)) or "rtn",
           **ev.onnx_row(path), "float_layers": float_rule_count(q), "seconds": seconds,
           "pass_seconds": {k: round(v, 2) for k, v in timings.items()}}
    row.pop("_onnx", None)
    return row


def fallback_row(zm, calib, ev: Evaluator, config: str, recipe, budget: float) -> dict:
    from lowbit.search import onnxruntime_runner
    from lowbit.search import fallback

    t0 = time.perf_counter()
    result = fallback(zm.model, calib, ev.x, recipe, min_agreement=0.99, budget_seconds=budget,
                      example_input=zm.example_input, runner=onnxruntime_runner(zm.example_input, recipe.target, THREADS))
    seconds = time.perf_counter() - t0
    return {"tool": "lowbit", "config": config, "passes": "fallback", "metric": result.agreement,
            "top1_agreement": result.agreement, "kl": result.loss, "float_layers": len(result.float_layers),
            "float_layer_names": list(result.float_layers), "met": result.met, "message": result.message,
            "verified": result.verified, "size_bytes": None, "seconds": seconds}


def effnet_configs(quick: bool):
    import lowbit

    w8 = lowbit.preset("int8").for_machine()
    w8_label = f"W8A8 (weights {w8.default_weight.bits}-bit per-channel, uint8 percentile activations)"
    rows = [(w8_label, w8.with_passes(*p)) for p in
            ((), ("cle",), ("bias_correction",), ("adaround", "bias_correction"), ("gptq", "bias_correction"))]
    w4 = with_weight_bits(w8, 4)
    rows += [("W4A8 (4-bit per-channel weights)", w4.with_passes(*p)) for p in ((), ("adaround", "bias_correction"),
                                                                             ("gptq", "bias_correction"))]
    if quick:
        rows = [rows[0], rows[2], rows[4], rows[5], rows[7]]
    return rows


def digits_configs():
    import lowbit

    w8 = lowbit.preset("int8").for_machine()
    out = []
    for bits in (4, 2):
        rec = with_weight_bits(w8, bits)
        for p in ((), ("adaround", "bias_correction"), ("gptq", "bias_correction")):
            out.append((f"W{bits}A8 (all layers {bits}-bit per-channel weights)", rec.with_passes(*p)))
    rec = with_weight_bits(w8, 2, "conv1", "fc")
    for p in ((), ("adaround", "bias_correction"), ("gptq", "bias_correction")):
        out.append(("W2A8, first conv and classifier 8-bit", rec.with_passes(*p)))
    return out


def bench_model(name: str, quick: bool, tmp: Path, fallback_budget: float) -> list[dict]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    zm, data = load(name, quick)
    n_calib = len(data.calib)
    batch = max(d for d in range(1, 17) if n_calib % d == 0)  # equal batches: ORT's histogram calibrators need them
    calib = list(data.calib.split(batch))
    ev = Evaluator(data.eval_inputs, data.eval_labels, repeats_b1=1, repeats_b32=1)
    fp32 = export_fp32_onnx(zm.model, zm.example_input, tmp / f"{name}_fp32.onnx")
    ev.ref = ev.outputs_onnx(fp32)
    common = {"model": name, "calib_samples": len(data.calib), "eval_samples": len(data.eval_inputs),
              "calib_batch": batch, "pass_batches": PASS_BATCHES, "pass_samples": min(n_calib, batch * PASS_BATCHES)}
    rows = []

    def add(row):
        row = {**common, **row}
        row.pop("_onnx", None)
        rows.append(row)
        say(f"{name:18s} {row['config'][:44]:44s} {row['passes']:28s} metric {row['metric']:.4f} agree "
            f"{row['top1_agreement']:.4f} kl {row['kl']:.4f} float {row['float_layers']} {row['seconds']:.0f} s")

    add({"tool": "fp32", "config": "FP32 ONNX", "passes": "-", **ev.onnx_row(fp32), "float_layers": 0, "seconds": 0.0})
    configs = effnet_configs(quick) if name == "efficientnet-lite0" else digits_configs()
    for config, recipe in configs:
        add(lowbit_row(zm, calib, ev, tmp, config, recipe, PASS_BATCHES))
    if name == "efficientnet-lite0":
        import lowbit

        add(fallback_row(zm, calib, ev, "W8A8 + fallback search to agreement >= 0.99", lowbit.preset("int8").for_machine(),
                         fallback_budget))
    pre = tmp / f"{name}_fp32_pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    ort_rows = []
    for method in (("MinMax",) if quick else ("MinMax", "Entropy", "Percentile")):
        try:
            ort_rows += run_ort(pre, calib, ev, tmp, method)
        except Exception as exc:  # one calibrator failing must not lose the other rows
            say(f"{name}: ORT {method} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    best = max(ort_rows, key=lambda r: r["top1_agreement"])
    label = f"anchor: ORT quantize_static, best of {len(ort_rows)}: {best['calibrator']}, reduce_range={best['reduce_range']}"
    add({"tool": "onnxruntime", "config": label, "config_full": best["config"], "passes": "-", "metric": best["metric"],
         "top1_agreement": best["top1_agreement"], "kl": best["kl"], "float_layers": 0, "size_bytes": best["size_bytes"],
         "seconds": best["quantize_seconds"],
         "all_ort": [{k: r[k] for k in ("config", "metric", "top1_agreement", "kl")} for r in ort_rows]})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, fewer configurations")
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "digits-cnn"])
    parser.add_argument("--fallback-budget", type=float, default=480.0, help="seconds for the fallback search")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-recovery-") as tmp:
        for name in args.models:
            rows += bench_model(name, args.quick, Path(tmp), 60.0 if args.quick else args.fallback_budget)
    common = stamp()
    total = time.perf_counter() - t0
    rows = [{**r, **common, "run_seconds": total} for r in rows]
    write_results("recovery_quick" if args.quick else "recovery", rows)
    say(f"total {total:.0f} s")
    return rows


if __name__ == "__main__":
    main()
