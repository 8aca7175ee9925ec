"""Mixed precision: fallback to float until top-1 agreement ≥ 0.99, and bit allocation under size budgets.

Rows (``bench/results/search.json``, ``search_quick.json`` with ``--quick``):

1. ``fallback`` — EfficientNet-Lite0, recipe ``int8``, photos (``n_calib`` calibration / ``n_eval`` evaluation
   views that never overlap): ``lowbit.search.fallback(min_agreement=0.99)``. Candidates are exported and run on
   ONNX Runtime (CPU EP, 2 threads: ``lowbit.search.onnxruntime_runner``), so ``agreement`` is the
   deployed engine's top-1 agreement with the FP32 ONNX on the evaluation views. Keys: ``met``, ``n_float``,
   ``float_layers``, ``agreement``, ``agreement_int8`` (the plain recipe), ``seconds`` (whole search, including
   the final end-to-end verification), ``candidates`` (recipes scored), ``rank_by``, ``message``; and, since
   the search selects on the evaluation views, ``agreement_heldout`` / ``agreement_int8_heldout``: the found
   and the plain recipe on fresh views (photo seed 1) the search never saw.
   The same row for digits-cnn with a coarse recipe (3-bit weights, 4-bit activations; plain int8 already
   agrees 100 %) in the PyTorch simulation.
2. ``allocation`` — ``lowbit.search.allocate_bits``: one row per budget. digits-cnn (PyTorch simulation,
   weights {2, 4, 8}, activations {8, 16}, size budgets between all-4-bit and all-8-bit weights) and
   EfficientNet-Lite0 (ONNX Runtime, weights {2, 4, 8} or {4, 8} quick, activations {8} only: 16-bit Q/DQ
   does not export at opset 17 yet), with the Pareto points measured on the evaluation data. Keys:
   ``budget``, ``predicted_size_mb`` (packed weight bits, MB = 10⁶ bytes), ``avg_bits``, ``bits``,
   ``metric``, ``agreement``, ``estimated_loss``, ``seconds``, ``pareto``.

Usage: ``.venv/bin/python bench/search.py [--quick] [--only digits|effnet-fallback|effnet-allocation]``.
The full run takes longer than 10 minutes on the shared 2-core machine (mostly ONNX export + ONNX Runtime per
EfficientNet candidate); ``--only`` runs one part. ``--quick`` (about 3.5 min): 32 / 64 views, 90 s budget.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see bench/ptq.py)

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import stamp, write_results  # noqa: E402

THREADS = 2
FULL = {"n_calib": 64, "n_eval": 256, "fallback_budget": 480.0, "rank_samples": 16, "estimate_samples": 16,
        "effnet_bits": (2, 4, 8), "pareto_points": 5, "alloc_budget": 600.0, "effnet_avg_bits": 6.0}
QUICK = {"n_calib": 32, "n_eval": 64, "fallback_budget": 90.0, "rank_samples": 8, "estimate_samples": 4,
         "effnet_bits": (4, 8), "pareto_points": 2, "alloc_budget": 60.0, "effnet_avg_bits": 6.0}


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def _fallback_row(name, zm, calib, x, recipe, runner, cfg, metric_fn=None) -> dict:
    from lowbit.search import fallback

    t0 = time.perf_counter()
    res = fallback(zm.model, calib, x, recipe, min_agreement=0.99, metric_fn=metric_fn, runner=runner,
                   example_input=zm.example_input, budget_seconds=cfg["fallback_budget"],
                   rank_samples=cfg["rank_samples"], progress=say)
    return {"task": "fallback", "model": name, "target": "agreement >= 0.99", "engine": res.engine,
            "met": res.met, "n_float": len(res.float_layers), "float_layers": list(res.float_layers),
            "agreement": res.agreement, "agreement_int8": res.history[0]["agreement"], "metric": res.metric,
            "metric_fp32": res.metric_fp32, "seconds": time.perf_counter() - t0, "candidates": len(res.history),
            "rank_by": res.rank_by, "verified": res.verified, "out_of_budget": res.out_of_budget,
            "message": res.message, "n_eval": int(x.shape[0])}


def _allocation_row(name, zm, calib, x, recipe, runner, budget: dict, cfg, **kw) -> dict:
    from lowbit.search import allocate_bits

    t0 = time.perf_counter()
    res = allocate_bits(zm.model, calib, x, recipe, runner=runner, example_input=zm.example_input,
                        estimate_samples=cfg["estimate_samples"], budget_seconds=cfg["alloc_budget"], **budget, **kw)
    say(f"{name} {budget}: {res.predicted_size_mb:.4g} MB, {res.avg_bits:.2f} bits → agreement {res.agreement:.4f}")
    return {"task": "allocation", "model": name, "engine": res.engine, "budget": budget,
            "weight_bits": list(res.budget["weight_bits"]), "act_bits": list(res.budget["act_bits"]),
            "predicted_size_mb": res.predicted_size_mb, "size_mb_w8": res.size_mb_w8, "size_mb_fp32": res.size_mb_fp32,
            "avg_bits": res.avg_bits, "bops_ratio": res.bops_ratio, "bits": res.pareto and next(
                p["bits"] for p in res.pareto if p["chosen"]), "metric": res.metric, "metric_fp32": res.metric_fp32,
            "agreement": res.agreement, "estimated_loss": res.estimated_loss, "seconds": time.perf_counter() - t0,
            "pareto": res.pareto, "n_eval": int(x.shape[0])}


def run_digits(cfg: dict) -> list[dict]:
    import lowbit
    from lowbit.analysis.metrics import accuracy
    from lowbit.search import torch_runner
    from lowbit.zoo import load_data, load_model

    zm, zd = load_model("digits-cnn"), load_data("digits")
    r = lowbit.preset("int8").for_machine()
    coarse = replace(r, default_weight=replace(r.default_weight, bits=3), default_input=replace(r.default_input, bits=4))
    acc = lambda ref, out: accuracy(out, zd.eval_labels)  # noqa: E731
    rows = [_fallback_row("digits-cnn (w3a4)", zm, zd.calib, zd.eval_inputs, coarse, torch_runner(), cfg)]
    for mb in (0.0045, 0.006, 0.008):
        rows.append(_allocation_row("digits-cnn", zm, zd.calib, zd.eval_inputs, r, torch_runner(),
                                    {"size_budget_mb": mb}, dict(cfg, estimate_samples=32), metric_fn=acc,
                                    pareto_points=0 if mb != 0.006 else 5))
    return rows


def run_effnet(cfg: dict, parts: set[str]) -> list[dict]:
    import lowbit
    from lowbit.search import onnxruntime_runner
    from lowbit.zoo import load_data, load_model

    zm = load_model("efficientnet-lite0")
    zd = load_data("photos", n_calib=cfg["n_calib"], n_eval=cfg["n_eval"])
    runner = onnxruntime_runner(zm.example_input, threads=THREADS)
    r = lowbit.preset("int8").for_machine()
    rows = []
    if "effnet-fallback" in parts:
        row = _fallback_row("efficientnet-lite0", zm, zd.calib, zd.eval_inputs, r, runner, cfg)
        say(row["message"])
        fresh = load_data("photos", n_calib=1, n_eval=cfg["n_eval"], seed=1).eval_inputs
        row.update(_heldout(zm, zd.calib, r, r.keep_float(*row["float_layers"]), fresh, runner))
        rows.append(row)
    if "effnet-allocation" in parts:
        rows.append(_allocation_row("efficientnet-lite0", zm, zd.calib, zd.eval_inputs, r, runner,
                                    {"avg_bits": cfg["effnet_avg_bits"]}, cfg, weight_bits=cfg["effnet_bits"],
                                    act_bits=(8,), pareto_points=cfg["pareto_points"]))
    return rows


def _heldout(zm, calib, recipe, found, x, runner) -> dict:
    """Agreement of the plain and the found recipe on views the search never saw (same engine)."""
    import lowbit
    from lowbit.search import Scorer

    plain = lowbit.quantize(zm.model, calib, recipe, zm.example_input, show_progress=False)
    scorer = Scorer(x, runner(plain, True))
    best = lowbit.quantize(zm.model, calib, found, zm.example_input, show_progress=False)
    return {"heldout": "fresh views (seed 1) of the evaluation photos", "n_heldout": int(x.shape[0]),
            "agreement_int8_heldout": scorer.score(runner(plain, False)).agreement,
            "agreement_heldout": scorer.score(runner(best, False)).agreement}


PARTS = ("digits", "effnet-fallback", "effnet-allocation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer views, shorter budgets (smoke run)")
    ap.add_argument("--only", choices=PARTS, default=None,
                    help="run one part; writes search[_quick]_<part>.json instead of search[_quick].json")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    parts = {args.only} if args.only else set(PARTS)
    import torch

    torch.set_num_threads(1)  # candidates run on ONNX Runtime (2 threads); torch only builds and estimates
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    rows = run_digits(cfg) if "digits" in parts else []
    if parts - {"digits"}:
        rows += run_effnet(cfg, parts - {"digits"})
    base = stamp()
    base["total_seconds"] = time.perf_counter() - t0
    name = "search_quick" if args.quick else "search"
    if args.only:
        name += f"_{args.only}"
    write_results(name, [dict(base, mode="quick" if args.quick else "full", **row) for row in rows])


if __name__ == "__main__":
    main()
