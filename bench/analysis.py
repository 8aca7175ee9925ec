"""Does ``lowbit.analyze`` point at the right layers? Cost of one analysis, and keep-float by its ranking vs at random.

Model and data (lowbit zoo): ``efficientnet-lite0`` on ``photos``, recipe ``preset("int8")``; 64 calibration
views (used both to calibrate and to analyse, as ``analyze`` does) and 256 evaluation views that never overlap them.

1. Cost: one full ``lowbit.analyze(model, calib, preset("int8"), example_input, budget_seconds=B, batch_size=32)``
   in a FRESH Python subprocess. ``analysis_seconds`` is the wall time of that call (quantization + streaming passes
   + gradient scores + sensitivity sweeps up to the budget). ``peak_rss_mb`` is the subprocess's RSS high-water mark
   (``VmHWM``, reset with ``clear_refs`` after model and data are loaded, so it is the peak of the analysis
   on top of what was already resident; ``rss_before_mb`` is that resident baseline).
2. Ranking check: layers are ranked by the analysis (key in the rows' ``config``); for k in 1, 2, 4, 8 the top-k
   layers are kept in float (``recipe.keep_float(*names)``), the model is quantized on the same 64 calibration
   views, exported to Q/DQ ONNX and run on ONNX Runtime (CPU EP, 2 threads) over the 256 evaluation views;
   ``agreement_ranked`` is its top-1 agreement with the FP32 ONNX on ONNX Runtime. ``agreement_random_median`` is
   the median over 5 draws (``random.Random(seed)``, seeds 0..4) of the same with k layers drawn uniformly from all
   quantized sites the analysis reported. The k=0 row is plain ``int8``.

Usage: ``.venv/bin/python bench/analysis.py [--quick]``. ``--quick``: digits-cnn, 8 analysis views, 256 test
digits, budget 5 s, k=1 only, 1 random draw (< 90 s); writes ``bench/results/analysis_quick.json``.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads); see bench/ptq.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import export_fp32_onnx, peak_rss_mb, reset_peak_rss, rss_mb, stamp, write_results  # noqa: E402

THREADS = 2
EVAL_BATCH = 32
RECIPE = "int8"

FULL = {"model": "efficientnet-lite0", "n_calib": 64, "n_eval": 256, "budget": 60.0, "ks": (1, 2, 4, 8), "draws": 5}
QUICK = {"model": "digits-cnn", "n_calib": 8, "n_eval": 256, "budget": 5.0, "ks": (1,), "draws": 1}

RANK_KEY = ("rank key: sites whose sensitivity was measured first, by sensitivity descending (agreement lost "
            "when only that site is quantized), ties by sqnr_db_cumulative ascending; then the sites the budget did "
            "not reach, by sqnr_db_cumulative ascending, ties by sqnr_db_isolated ascending")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def load(cfg: dict):
    from lowbit.zoo import load_data, load_model

    zm = load_model(cfg["model"])
    data = load_data(zm.default_data, n_calib=cfg["n_calib"], n_eval=cfg["n_eval"])
    return zm, data


# ---------------------------------------------------------------------------------------------- worker (subprocess)
def worker(cfg_json: str, out_path: str) -> None:
    """Run one ``analyze`` and write ``{"seconds", "peak_rss_mb", "rss_before_mb", "result"}`` to ``out_path``."""
    import torch

    import lowbit
    from lowbit.analysis.analyze import analyze

    cfg = json.loads(cfg_json)
    torch.set_num_threads(THREADS)
    logging.basicConfig(level=logging.ERROR)
    zm, data = load(cfg)
    recipe = lowbit.preset(RECIPE).for_machine()
    before = rss_mb()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    result = analyze(zm.model, data.calib, recipe, zm.example_input, budget_seconds=cfg["budget"], batch_size=32)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    Path(out_path).write_text(json.dumps({
        "seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "peak_reset": reset_ok,
        "result": result.to_json()}))


def run_analysis_subprocess(cfg: dict, tmp: Path) -> dict:
    out = tmp / "analysis_worker.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps({**cfg, "ks": list(cfg["ks"])}),
           str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"analysis worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res["process_seconds"] = wall
    return res


# ---------------------------------------------------------------------------------------------- ranking
def _num(v) -> float:
    """A row value as a float for sorting: missing / "not measured" / nan last (+inf), "-inf" first."""
    if isinstance(v, str):
        return {"inf": math.inf, "-inf": -math.inf}.get(v, math.inf)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.inf
    return float(v)


def rank_layers(rows: list[dict]) -> list[str]:
    """Layer names, most harmful first (``RANK_KEY``)."""
    def key(r: dict):
        s = r.get("sensitivity")
        measured = isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
        if measured:
            return (0, -float(s), _num(r.get("sqnr_db_cumulative")), _num(r.get("sqnr_db_isolated")))
        return (1, 0.0, _num(r.get("sqnr_db_cumulative")), _num(r.get("sqnr_db_isolated")))

    return [r["layer"] for r in sorted(rows, key=key)]


# ---------------------------------------------------------------------------------------------- measuring
class OrtEval:
    def __init__(self, x) -> None:
        self.x = x
        self.ref = None

    def outputs(self, path: Path):
        import torch

        from lowbit.export.runtime import make_session, run_session

        session = make_session(path, THREADS)
        return torch.cat([run_session(session, b) for b in self.x.split(EVAL_BATCH)])

    def agreement(self, path: Path) -> float:
        from lowbit.analysis.metrics import top1_agreement

        return float(top1_agreement(self.ref, self.outputs(path)))


def quantize_export(zm, calib, float_layers: list[str], path: Path) -> dict:
    import onnx

    import lowbit

    recipe = lowbit.preset(RECIPE).for_machine()
    if float_layers:
        recipe = recipe.keep_float(*float_layers)
    t0 = time.perf_counter()
    qmodel = lowbit.quantize(zm.model, calib, recipe, zm.example_input, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.export_onnx(qmodel, zm.example_input, path, target=recipe.target, check_parity=False)
    nodes = onnx.load(str(path)).graph.node
    n_q = sum(1 for n in nodes if n.op_type == "QuantizeLinear")
    return {"seconds": time.perf_counter() - t0, "quantize_nodes": n_q}


def measure(zm, calib, ev: OrtEval, float_layers: list[str], tmp: Path, tag: str) -> dict:
    path = tmp / f"{tag}.onnx"
    info = quantize_export(zm, calib, float_layers, path)
    agree = ev.agreement(path)
    path.unlink(missing_ok=True)
    return {"agreement": agree, **info}


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits-cnn, 8 views, k=1, 1 random draw (< 90 s)")
    parser.add_argument("--_worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        worker(*args._worker)
        return []

    import torch

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    common = stamp()

    with tempfile.TemporaryDirectory(prefix="lowbit-bench-analysis-") as tmpdir:
        tmp = Path(tmpdir)
        say(f"analyze {cfg['model']} ({cfg['n_calib']} views, budget {cfg['budget']:.0f} s) in a subprocess ...")
        an = run_analysis_subprocess(cfg, tmp)
        rows_an = an["result"]["rows"]
        n_meas = sum(1 for r in rows_an if isinstance(r.get("sensitivity"), (int, float)))
        say(f"analysis {an['seconds']:.1f} s, peak RSS {an['peak_rss_mb']:.0f} MiB "
            f"(before {an['rss_before_mb']:.0f} MiB), {len(rows_an)} sites, sensitivity measured on {n_meas}")
        ranked = rank_layers(rows_an)
        pool = [r["layer"] for r in rows_an]
        say("top ranked: " + ", ".join(ranked[:max(cfg["ks"])]))

        zm, data = load(cfg)
        calib = data.calib
        ev = OrtEval(data.eval_inputs)
        fp32 = export_fp32_onnx(zm.model, zm.example_input, tmp / "fp32.onnx")
        ev.ref = ev.outputs(fp32)

        base_cfg = (f"{cfg['model']}, recipe {RECIPE}; analyze on {cfg['n_calib']} calibration views "
                    f"(budget_seconds={cfg['budget']:g}, batch_size=32; sensitivity measured on {n_meas} of "
                    f"{len(rows_an)} sites), fresh subprocess; agreement = top-1 agreement with the FP32 ONNX on "
                    f"ONNX Runtime over {len(data.eval_inputs)} evaluation views; every model calibrated on the "
                    f"same {cfg['n_calib']} views; random = median over {cfg['draws']} draws of k sites uniformly "
                    f"from all {len(pool)} analysed sites (random.Random(seed), seeds 0..{cfg['draws'] - 1}); "
                    + RANK_KEY)
        an_fields = {"analysis_seconds": an["seconds"], "peak_rss_mb": an["peak_rss_mb"],
                     "rss_before_mb": an["rss_before_mb"], "analysis_process_seconds": an["process_seconds"],
                     "n_sites": len(pool), "n_sensitivity_measured": n_meas,
                     "metric_fp32_vs_quant_torch": an["result"]["metric_fp32_vs_quant"]}

        rows: list[dict] = []
        base = measure(zm, calib, ev, [], tmp, "k0")
        say(f"k=0: agreement {base['agreement']:.4f} ({base['quantize_nodes']} QuantizeLinear)")
        rows.append({"k": 0, "agreement_ranked": base["agreement"], "agreement_random_median": base["agreement"],
                     **an_fields, "config": base_cfg + "; k=0: plain int8, nothing kept in float",
                     "float_layers_ranked": [], "quantize_nodes_ranked": base["quantize_nodes"]})
        for k in cfg["ks"]:
            top = ranked[:k]
            r = measure(zm, calib, ev, top, tmp, f"ranked{k}")
            rand, rand_sets, rand_nodes = [], [], []
            for seed in range(cfg["draws"]):
                pick = random.Random(seed).sample(pool, k)
                m = measure(zm, calib, ev, pick, tmp, f"rand{k}_{seed}")
                rand.append(m["agreement"])
                rand_sets.append(pick)
                rand_nodes.append(m["quantize_nodes"])
            med = statistics.median(rand)
            say(f"k={k}: ranked {r['agreement']:.4f}  random median {med:.4f}  draws "
                f"{', '.join(f'{a:.4f}' for a in rand)}")
            rows.append({"k": k, "agreement_ranked": r["agreement"], "agreement_random_median": med, **an_fields,
                         "config": base_cfg, "float_layers_ranked": top, "quantize_nodes_ranked": r["quantize_nodes"],
                         "agreement_random_draws": rand, "float_layers_random": rand_sets,
                         "quantize_nodes_random": rand_nodes,
                         "ranked_minus_random_median": r["agreement"] - med,
                         "ranked_vs_random": ("better" if r["agreement"] > med else
                                              "tie" if r["agreement"] == med else "worse")})

    total = time.perf_counter() - t_start
    say(f"total {total:.0f} s")
    keys = ("k", "agreement_ranked", "agreement_random_median", "analysis_seconds", "peak_rss_mb", "config")
    out = []
    for row in rows:
        o = {k: row.get(k) for k in keys}
        o.update({k: v for k, v in row.items() if k not in keys})
        o.update(common, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), run_seconds=total)
        out.append(o)
    write_results("analysis_quick" if args.quick else "analysis", out)
    return out


if __name__ == "__main__":
    main()
