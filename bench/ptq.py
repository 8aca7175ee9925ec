"""Post-training INT8: lowbit beside ONNX Runtime ``quantize_static`` and torch.ao FX, same models, same data.

Models and data (lowbit zoo): ``efficientnet-lite0`` on ``photos`` (64 calibration views, 256 evaluation views;
metric: top-1 agreement with FP32) and ``digits-cnn`` on ``digits`` (its calibration split; metric: test accuracy).

* FP32: the float model exported once to ONNX (TorchScript exporter, opset 17); its ONNX Runtime outputs are the
  reference of every ``top1_agreement`` and ``kl``.
* lowbit: ``lowbit.quantize(model, calib, preset(r).with_calibrator(c), example)`` for r in ``int8``,
  ``int8-per-tensor`` and c in minmax / percentile / entropy / mse, exported with ``lowbit.export_onnx`` (Q/DQ)
  and run on ONNX Runtime.
* ONNX Runtime: ``quantize_static`` (QDQ, per_channel=True, QUInt8 activations, QInt8 weights) with MinMax /
  Entropy / Percentile (ORT's default calibrator options) on the same FP32 ONNX after ORT's recommended
  ``quant_pre_process``, fed the same calibration batches; once with reduce_range=False and once with
  reduce_range=True (7-bit weights; this CPU has no VNNI), the second reusing the first's calibration through
  ``calibration_cache_path``.
* torch.ao: FX graph mode PTQ, ``get_default_qconfig_mapping("x86")``, ``prepare_fx`` → calibration →
  ``convert_fx``, run in PyTorch (a failure becomes a row with an ``error`` field).

Latency: median of ``session.run`` on ONNX Runtime (CPU EP, 2 intra-op threads, full graph optimisation) for batch 1
and batch 32, the same settings for every ONNX row; torch.ao in PyTorch with ``torch.set_num_threads(2)``.
``size_bytes`` is the ONNX file size (torch.ao: the serialized ``state_dict``). ``calib_seconds`` is the wall time
of the PTQ call (lowbit.quantize / quantize_static / prepare_fx+calibration+convert_fx); export time is separate.

Usage: ``.venv/bin/python bench/ptq.py [--quick] [--models NAME ...]``; writes ``bench/results/ptq.json``
(``ptq_quick.json`` with ``--quick``, so a smoke run never overwrites the full figures).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads): on a shared 2-core machine the default
# spin-wait makes PyTorch 3x (forward passes) to 100x (small ops) slower. Override by exporting OMP_WAIT_POLICY.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import export_fp32_onnx, stamp, write_results  # noqa: E402

THREADS = 2
MAX_CALIB_BATCH = 16  # calibration batch: the largest divisor of the set size <= 16 (ORT's histogram
# calibrators stack all batches into one array and fail on a ragged last batch)
EVAL_BATCH = 32
LOWBIT_RECIPES = ("int8", "int8-per-tensor")
LOWBIT_CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
ORT_DEFAULTS = {
    "MinMax": "symmetric=False",
    "Entropy": "num_bins=128, num_quantized_bins=128, symmetric=False",
    "Percentile": "num_bins=2048, percentile=99.999, symmetric=True",
}

log = logging.getLogger("bench.ptq")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- measuring
class Evaluator:
    """Runs ONNX files on ONNX Runtime over the evaluation set and compares them with the FP32 reference."""

    def __init__(self, eval_inputs: torch.Tensor, labels: torch.Tensor | None, repeats_b1: int, repeats_b32: int):
        self.x, self.labels = eval_inputs, labels
        self.repeats_b1, self.repeats_b32 = repeats_b1, repeats_b32
        self.ref: torch.Tensor | None = None

    def outputs_onnx(self, path: Path) -> torch.Tensor:
        from lowbit.export.runtime import make_session, run_session

        session = make_session(path, THREADS)
        return torch.cat([run_session(session, b) for b in self.x.split(EVAL_BATCH)])

    def latency_round_robin(self, paths: list[Path], rounds: int) -> dict[Path, tuple[float, float]]:
        """Batch-1 and batch-32 latency of every file, measured in ``rounds`` interleaved rounds.

        Each round opens a fresh session per file (lowbit's ``make_session``: CPU EP, 2 intra-op threads, full
        optimisation), warms it up, and times ``repeats_b1`` batch-1 and ``repeats_b32`` batch-32 runs; the figure
        is the median of all samples of a file. Interleaving spreads the load of a shared machine over all files.
        """
        from lowbit.export.runtime import make_session

        x1, x32 = self.x[:1].numpy(), self.x[:EVAL_BATCH].numpy()
        samples: dict[Path, tuple[list[float], list[float]]] = {p: ([], []) for p in paths}
        for _ in range(rounds):
            for path in paths:
                session = make_session(path, THREADS)
                name = session.get_inputs()[0].name
                for x, reps, warm, out in ((x1, self.repeats_b1, 3, samples[path][0]),
                                           (x32, self.repeats_b32, 1, samples[path][1])):
                    for _ in range(warm):
                        session.run(None, {name: x})
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        session.run(None, {name: x})
                        out.append((time.perf_counter() - t0) * 1e3)
                del session
        return {p: (statistics.median(b1), statistics.median(b32)) for p, (b1, b32) in samples.items()}

    def scores(self, out: torch.Tensor) -> dict:
        from lowbit.analysis.metrics import accuracy, kl_softmax, top1_agreement

        assert self.ref is not None
        agree = top1_agreement(self.ref, out)
        res = {"top1_agreement": agree, "kl": kl_softmax(self.ref, out)}
        if self.labels is not None:
            res["metric"], res["metric_name"] = accuracy(out, self.labels), "test accuracy"
        else:
            res["metric"], res["metric_name"] = agree, "top-1 agreement with FP32"
        return res

    def onnx_row(self, path: Path) -> dict:
        """Scores and file size; latency is filled in later (``latency_round_robin``) from ``_onnx``."""
        out = self.outputs_onnx(path)
        return {**self.scores(out), "size_bytes": path.stat().st_size, "_onnx": path}


def torch_latency_ms(model, x: torch.Tensor, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- tools
def run_lowbit(zm, calib: list[torch.Tensor], ev: Evaluator, tmp: Path, recipe_name: str, calibrator: str) -> dict:
    import lowbit

    recipe = lowbit.preset(recipe_name).with_calibrator(calibrator).for_machine()
    t0 = time.perf_counter()
    qmodel = lowbit.quantize(zm.model, calib, recipe, zm.example_input, show_progress=False)
    calib_seconds = time.perf_counter() - t0
    path = tmp / f"lowbit_{recipe_name}_{calibrator}.onnx"
    t0 = time.perf_counter()
    lowbit.export_onnx(qmodel, zm.example_input, path, target=recipe.target)
    export_seconds = time.perf_counter() - t0
    w = recipe.default_weight
    config = (f"recipe {recipe_name}, activations {calibrator}; weights {w.bits}-bit symmetric "
              f"{type(w.granularity).__name__} (int8 container), activations uint8 asymmetric per-tensor")
    row = {"tool": "lowbit", "config": config, "recipe": recipe_name, "calibrator": calibrator,
           **ev.onnx_row(path), "calib_seconds": calib_seconds, "export_seconds": export_seconds}
    return row


class _Reader:
    """CalibrationDataReader over the calibration tensor (fresh iterator per quantize_static call)."""

    def __init__(self, calib: list[torch.Tensor], input_name: str) -> None:
        self.batches = [b.numpy() for b in calib]
        self.name, self.i = input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def __len__(self) -> int:
        return len(self.batches)


def run_ort(fp32_pre: Path, calib, ev: Evaluator, tmp: Path, method_name: str) -> list[dict]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    reader_cls = type("Reader", (_Reader, CalibrationDataReader), {})
    method = getattr(CalibrationMethod, method_name)
    cache = tmp / f"{fp32_pre.stem}_{method_name}.calib.json"
    rows, first_seconds = [], None
    for reduce_range in (False, True):
        path = tmp / f"ort_{method_name}_rr{int(reduce_range)}.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            quantize_static(
                str(fp32_pre), str(path), reader_cls(calib, "input"), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, calibration_cache_path=str(cache),
            )
        seconds = time.perf_counter() - t0
        config = (f"quantize_static QDQ, per_channel=True, QUInt8 act / QInt8 weight, {method_name} "
                  f"({ORT_DEFAULTS[method_name]}), reduce_range={reduce_range}")
        if reduce_range:
            config += "; calibration reused from the reduce_range=False run (calibration_cache_path), " \
                      "calib_seconds is that run's"
        else:
            first_seconds = seconds
        rows.append({"tool": "onnxruntime", "config": config, "calibrator": method_name.lower(),
                     "reduce_range": reduce_range, **ev.onnx_row(path),
                     "calib_seconds": first_seconds, "quantize_seconds": seconds})
    return rows


class _quiet_stdout:
    """ORT's calibrators print progress lines on stdout; keep stdout for the JSON."""

    def __enter__(self):
        self._old, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._old


def run_torch_ao(zm, calib, ev: Evaluator) -> dict:
    base = {"tool": "torch.ao", "config": 'FX graph mode PTQ, get_default_qconfig_mapping("x86"), '
            "prepare_fx/convert_fx, run in PyTorch (torch.set_num_threads(2)); latency_ms_b32 = median of the "
            "evaluation's batch-32 forwards (first one excluded)"}
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            prepared = prepare_fx(copy.deepcopy(zm.model).eval(), get_default_qconfig_mapping("x86"),
                                  example_inputs=(zm.example_input,))
            with torch.no_grad():
                for b in calib:
                    prepared(b)
            qmodel = convert_fx(prepared)
            calib_seconds = time.perf_counter() - t0
            outs, batch_ms = [], []
            with torch.no_grad():
                for b in ev.x.split(EVAL_BATCH):
                    t0 = time.perf_counter()
                    outs.append(qmodel(b))
                    batch_ms.append((time.perf_counter() - t0) * 1e3)
            out = torch.cat(outs)
            full = [t for b, t in zip(ev.x.split(EVAL_BATCH), batch_ms) if len(b) == EVAL_BATCH]
            if full:
                b32 = statistics.median(full[1:] if len(full) > 1 else full)
            else:  # fewer than 32 evaluation inputs (--quick): time the whole set once
                b32 = torch_latency_ms(qmodel, ev.x[:EVAL_BATCH], 1, 0)
            b1 = torch_latency_ms(qmodel, ev.x[:1], max(5, ev.repeats_b1 // 4), 2)
        buf = io.BytesIO()
        torch.save(qmodel.state_dict(), buf)
        return {**base, **ev.scores(out), "latency_ms_b1": b1, "latency_ms_b32": b32,
                "size_bytes": buf.getbuffer().nbytes, "calib_seconds": calib_seconds}
    except Exception as exc:  # torch.ao is deprecated; record what broke instead of crashing the benchmark
        return {**base, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400],
                "traceback_tail": traceback.format_exc().strip().splitlines()[-3:]}


# ---------------------------------------------------------------------------------------------- driver
def load(name: str, quick: bool):
    from lowbit.zoo import load_data, load_model

    zm = load_model(name)
    if name == "efficientnet-lite0" and quick:
        from lowbit.zoo import ZooData, ZooModel
        from lowbit.zoo.photos import photo_views

        size = 64
        data = ZooData("photos", photo_views("calib", 8, seed=0, size=size), photo_views("eval", 16, seed=0, size=size),
                       None)
        zm = ZooModel(zm.name, zm.model, data.calib[:1].clone(), zm.default_data)
        return zm, data
    if quick:
        return zm, load_data(zm.default_data, n_calib=64, n_eval=128)
    return zm, load_data(zm.default_data)


def bench_model(name: str, quick: bool, tmp: Path) -> list[dict]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t_model = time.perf_counter()
    zm, data = load(name, quick)
    n_calib = len(data.calib)
    batch = max(d for d in range(1, MAX_CALIB_BATCH + 1) if n_calib % d == 0)
    calib = list(data.calib.split(batch))  # the same batches for every tool
    big = name == "efficientnet-lite0"
    if quick:
        ev = Evaluator(data.eval_inputs, data.eval_labels, repeats_b1=5, repeats_b32=2)
    else:
        ev = Evaluator(data.eval_inputs, data.eval_labels, repeats_b1=20 if big else 50, repeats_b32=5 if big else 20)
    common = {"model": name, "calib_samples": n_calib, "calib_batch": batch, "eval_samples": len(data.eval_inputs)}
    rows: list[dict] = []

    def add(row: dict) -> None:
        row = {**common, **row}
        rows.append(row)
        if "error" in row:
            say(f"{name:18s} {row['tool']:11s} {row.get('config', '')[:60]}: ERROR {row['error']}")
        else:
            say(f"{name:18s} {row['tool']:11s} {row.get('recipe', '')} {row.get('calibrator', '')}"
                f"{' rr' if row.get('reduce_range') else ''}: metric {row['metric']:.4f} agree "
                f"{row['top1_agreement']:.4f} kl {row['kl']:.4f} calib {row.get('calib_seconds') or 0:.1f} s")

    fp32 = export_fp32_onnx(zm.model, zm.example_input, tmp / f"{name}_fp32.onnx")
    ev.ref = ev.outputs_onnx(fp32)
    add({"tool": "fp32", "config": "FP32 ONNX (TorchScript exporter, opset 17) on ONNX Runtime", **ev.onnx_row(fp32),
         "calib_seconds": None})

    calibrators = ("minmax", "entropy") if quick else LOWBIT_CALIBRATORS
    for recipe_name in LOWBIT_RECIPES:
        for calibrator in calibrators:
            try:
                add(run_lowbit(zm, calib, ev, tmp, recipe_name, calibrator))
            except Exception as exc:
                add({"tool": "lowbit", "recipe": recipe_name, "calibrator": calibrator,
                     "config": f"recipe {recipe_name}, activations {calibrator}",
                     "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]})

    t0 = time.perf_counter()
    fp32_pre = tmp / f"{name}_fp32_pre.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32), str(fp32_pre))
    pre_seconds = time.perf_counter() - t0
    for method in (("MinMax", "Entropy") if quick else ORT_METHODS):
        try:
            for row in run_ort(fp32_pre, calib, ev, tmp, method):
                add({**row, "preprocess_seconds": pre_seconds})
        except Exception as exc:
            add({"tool": "onnxruntime", "calibrator": method.lower(), "config": f"quantize_static {method}",
                 "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]})

    add(run_torch_ao(zm, calib, ev))

    t0 = time.perf_counter()
    onnx_rows = [r for r in rows if "_onnx" in r]
    latency = ev.latency_round_robin([r["_onnx"] for r in onnx_rows], rounds=3)
    for r in onnx_rows:
        r["latency_ms_b1"], r["latency_ms_b32"] = latency[r.pop("_onnx")]
    fp32_b1, fp32_b32 = rows[0]["latency_ms_b1"], rows[0]["latency_ms_b32"]
    for r in rows:
        if r.get("latency_ms_b1"):
            r["speedup_vs_fp32_b1"] = fp32_b1 / r["latency_ms_b1"]
            r["speedup_vs_fp32_b32"] = fp32_b32 / r["latency_ms_b32"]
        label = f"{r['tool']} {r.get('recipe', '')} {r.get('calibrator', '')}{' rr' if r.get('reduce_range') else ''}"
        if "latency_ms_b1" in r:
            say(f"{name:18s} {label:40s} b1 {r['latency_ms_b1']:8.2f} ms  b32 {r['latency_ms_b32']:9.1f} ms")
    say(f"{name}: latency {time.perf_counter() - t0:.0f} s, model total {time.perf_counter() - t_model:.0f} s")
    return rows


KEYS = ("model", "tool", "config", "metric", "top1_agreement", "kl", "latency_ms_b1", "latency_ms_b32", "size_bytes",
        "calib_seconds")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits-cnn (64 calib / 128 test) and EfficientNet-Lite0 on 64x64 views "
                             "(8 calib / 16 eval), minmax+entropy calibrators only")
    parser.add_argument("--models", nargs="+", default=["efficientnet-lite0", "digits-cnn"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer warns on every call ("consider pre-processing")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    rows: list[dict] = []
    common = stamp()
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-ptq-") as tmp:
        for name in args.models:
            rows += bench_model(name, args.quick, Path(tmp))
    total = time.perf_counter() - t0
    say(f"total {total:.0f} s")
    ordered = []
    for row in rows:
        out = {k: row.get(k) for k in KEYS}
        out.update({k: v for k, v in row.items() if k not in KEYS})
        out.update(common, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), run_seconds=total)
        ordered.append(out)
    write_results("ptq_quick" if args.quick else "ptq", ordered)
    return ordered


if __name__ == "__main__":
    main()
