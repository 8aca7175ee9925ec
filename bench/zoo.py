"""Reference zoo: lowbit INT8 beside ONNX Runtime ``quantize_static`` on every zoo model, one row per model.

For each model (default: ``lowbit.zoo.REFERENCE_ZOO`` plus ``efficientnet-lite0`` and ``digits-cnn``), in a
fresh worker process so memory stays bounded:

* lowbit: ``lowbit.quantize(model, calib, preset("int8"), example)`` → ``export_onnx`` writes
  ``model_fp32.onnx`` (quantizers disabled) and ``model_int8.onnx`` (Q/DQ).
* ONNX Runtime: ``quant_pre_process`` then ``quantize_static`` on lowbit's ``model_fp32.onnx`` with the SAME
  calibration batches (``CalibrationDataReader``), QDQ format, ``per_channel=True``, MinMax, QUInt8 activations,
  QInt8 weights.
* ``heavy_ops``: Conv, ConvTranspose, MatMul, Gemm, LSTM, GRU nodes of the FP32 graph. ``int_kernels_*``: nodes of
  the graph ONNX Runtime really executes after its optimisations (``optimized_op_types``) that are integer
  versions of those ops (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger, QGemm, ...).
* latency: ``session.run`` medians on ONNX Runtime (CPU EP, 2 intra-op threads, full optimisation) for batch 1 and
  batch 32; FP32, lowbit and ORT files are measured in interleaved rounds (a fresh session per file per round).
* ``sqnr_db``, ``cosine``, ``top1_agreement``: lowbit INT8 vs FP32, both run on ONNX Runtime over the evaluation
  inputs (``lowbit.analysis.metrics``; top-1 over the class axis, ``None`` for models whose output is features);
  the ``*_ort`` fields are the same for ORT's file. ``parity_ok``: lowbit's PyTorch simulation vs its INT8 file
  on ONNX Runtime (``check_onnx_parity``: 99.9% of elements within one output step, else tensor by tensor;
  ``parity_fraction`` is the output-level share, ``parity_segment`` the tensor-by-tensor result when it ran).
* ``float_ops_reported``: number of entries of lowbit's ``float_layers`` as report.json has them (what prepare_
  left in float, plus every heavy op ONNX Runtime runs in float that no such entry names).

A model that fails gets a row with an ``error`` key (one line) and the run goes on.

Usage: ``.venv/bin/python bench/zoo.py [--quick] [--models a,b] [--threads N]``; writes ``bench/results/zoo.json``
(a run over a subset of the default models writes ``bench/results/zoo_partial.json`` instead, a run with other
than 2 threads ``bench/results/zoo_threads<N>.json``).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads), as in bench/ptq.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_flags, stamp, write_results  # noqa: E402

THREADS = int(os.environ.get("LOWBIT_ZOO_THREADS", "2"))  # --threads sets it for the workers
EVAL_BATCH = 32
EXTRA_MODELS = ("efficientnet-lite0", "digits-cnn")
HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU")
HEAVY_INT_KERNELS = ("QLinearConv", "ConvInteger", "QLinearConvTranspose", "QLinearMatMul", "MatMulInteger", "QGemm",
                     "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM")
# float ops of the optimized graph that still do the heavy work (ORT fuses Conv/MatMul with their neighbours)
HEAVY_FLOAT_KERNELS = HEAVY_OPS + ("FusedConv", "FusedMatMul", "FusedGemm", "NhwcFusedConv", "Attention",
                                   "MultiHeadAttention")
KEYS = ("model", "heavy_ops", "int_kernels_lowbit", "int_kernels_ort", "latency_ms_b1_fp32", "latency_ms_b1_lowbit",
        "latency_ms_b1_ort", "latency_ms_b32_fp32", "latency_ms_b32_lowbit", "latency_ms_b32_ort", "sqnr_db", "cosine",
        "top1_agreement", "parity_ok", "float_ops_reported")
# (n_calib, calib batch, n_eval, rounds, repeats b1, repeats b32)
SETTINGS = {"full": (64, 16, 128, 3, 20, 5), "quick": (16, 8, 32, 3, 5, 2)}
WORKER_TIMEOUT_S = 1800

log = logging.getLogger("bench.zoo")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def one_line(exc: BaseException, stage: str) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return f"{stage}: {text[:300]}"


class _quiet_stdout:
    """ORT's calibrators print progress lines on stdout; keep stdout for the JSON."""

    def __enter__(self):
        self._old, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc):
        sys.stdout = self._old


# ---------------------------------------------------------------------------------------------- graphs
def heavy_op_count(path: Path) -> int:
    """Conv / ConvTranspose / MatMul / Gemm / LSTM / GRU nodes of an ONNX file (as written, not optimised)."""
    import onnx

    return sum(node.op_type in HEAVY_OPS for node in onnx.load(str(path), load_external_data=False).graph.node)


def kernel_counts(path: Path) -> dict:
    """Heavy integer kernels, all integer kernels and heavy float kernels of the graph ORT executes."""
    from lowbit.export.runtime import int8_kernel_count, optimized_op_types

    ops: Counter = optimized_op_types(path, THREADS)
    return {"heavy_int": sum(ops[k] for k in HEAVY_INT_KERNELS), "all_int": int8_kernel_count(ops),
            "heavy_float": sum(ops[k] for k in HEAVY_FLOAT_KERNELS)}


# ---------------------------------------------------------------------------------------------- tools
def run_lowbit(zm, calib: list, tmp: Path) -> tuple[object, Path, Path, float]:
    """Quantize with preset int8 and export the FP32 and INT8 files; returns (qmodel, fp32, int8, seconds)."""
    import lowbit

    t0 = time.perf_counter()
    # recurrent layers have no static INT8 kernel in ONNX Runtime: kept float by rule (listed in float_layers)
    recipe = lowbit.preset("int8").keep_float("type:LSTM", "type:GRU").for_machine()
    qmodel = lowbit.quantize(zm.model, calib, recipe, zm.example_input, show_progress=False)
    seconds = time.perf_counter() - t0
    fp32 = lowbit.export_onnx(qmodel, zm.example_input, tmp / "model_fp32.onnx", float_model=True)
    int8 = lowbit.export_onnx(qmodel, zm.example_input, tmp / "model_int8.onnx", check_parity=False)
    return qmodel, fp32, int8, seconds


class _Reader:
    """Calibration batches for ORT (a fresh reader per ``quantize_static`` call)."""

    def __init__(self, calib: list, input_name: str) -> None:
        self.batches, self.name, self.i = [b.numpy() for b in calib], input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}


def run_ort(fp32: Path, calib: list, tmp: Path) -> tuple[Path, float, str]:
    """``quantize_static`` (QDQ, per-channel, MinMax) on ``fp32``; returns (path, seconds, what it started from)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre = tmp / "model_fp32_pre.onnx", "quant_pre_process"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(fp32), str(src))
    except Exception as exc:  # ORT's pre-processing is optional; quantize the plain file then
        src, pre = fp32, f"plain (quant_pre_process failed: {one_line(exc, 'pre')})"
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib, "input")
    out = tmp / "ort_int8.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out, time.perf_counter() - t0, pre


# ---------------------------------------------------------------------------------------------- measuring
def outputs(path: Path, x) -> object:
    import torch

    from lowbit.export.runtime import make_session, run_session

    session = make_session(path, THREADS)
    return torch.cat([run_session(session, b) for b in x.split(EVAL_BATCH)])


def scores(ref, out, kind: str) -> tuple[float, float, float | None]:
    """(sqnr_db, cosine, top1_agreement) of ``out`` against ``ref``; top-1 over the class axis of ``kind``."""
    from lowbit.analysis.metrics import cosine, sqnr_db, top1_agreement

    if kind == "pixel-logits":
        top1 = top1_agreement(ref.movedim(1, -1), out.movedim(1, -1))
    else:
        top1 = top1_agreement(ref, out) if kind == "logits" else None
    return sqnr_db(ref, out), cosine(ref, out), top1


def latency_round_robin(paths: dict[str, Path], x, rounds: int, reps_b1: int, reps_b32: int) -> dict:
    """Median batch-1 and batch-32 latency (ms) of each file, over ``rounds`` interleaved rounds."""
    from lowbit.export.runtime import input_feed, make_session

    x1, x32 = x[:1], x[:EVAL_BATCH]
    samples = {key: ([], []) for key in paths}
    for _ in range(rounds):
        for key, path in paths.items():
            session = make_session(path, THREADS)
            for batch, reps, warm, out in ((x1, reps_b1, 3, samples[key][0]), (x32, reps_b32, 1, samples[key][1])):
                feed = input_feed(session, batch)
                for _ in range(warm):
                    session.run(None, feed)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    session.run(None, feed)
                    out.append((time.perf_counter() - t0) * 1e3)
            del session
    return {key: (statistics.median(b1), statistics.median(b32)) for key, (b1, b32) in samples.items()}


# ---------------------------------------------------------------------------------------------- one model
def output_kind(name: str) -> str:
    from lowbit.zoo.archs import ARCHS

    return ARCHS[name].output if name in ARCHS else "logits"


def load(name: str, mode: str):
    """The zoo model, its calibration batches and its evaluation inputs (sizes from :data:`SETTINGS`)."""
    from lowbit.zoo import load_data, load_model

    n_calib, batch, n_eval = SETTINGS[mode][:3]
    zm = load_model(name)
    data = load_data(zm.default_data, n_calib=n_calib, n_eval=n_eval)
    return zm, list(data.calib.split(batch)), data.eval_inputs


def measure_ort_side(row: dict, fp32: Path, calib: list, tmp: Path, x, ref, kind: str) -> Path | None:
    """Fill the ORT fields of ``row``; returns ORT's file, or None (``ort_error`` set) when quantize_static fails."""
    try:
        ort_path, seconds, pre = run_ort(fp32, calib, tmp)
        counts = kernel_counts(ort_path)
    except Exception as exc:
        row.update(int_kernels_ort=None, ort_error=one_line(exc, "quantize_static"))
        return None
    sqnr, cos, top1 = scores(ref, outputs(ort_path, x), kind)
    row.update(int_kernels_ort=counts["heavy_int"], sqnr_db_ort=sqnr, cosine_ort=cos, top1_agreement_ort=top1,
               int_kernels_all_ort=counts["all_int"], float_heavy_kernels_ort=counts["heavy_float"],
               ort_quantize_seconds=seconds, ort_input=pre)
    return ort_path


def bench_model(name: str, mode: str, tmp: Path) -> dict:
    """Every field of one row (raises on a lowbit failure; the caller turns it into an ``error`` row)."""
    import lowbit
    from lowbit.jobs.outputs import float_layers
    from lowbit.report.engine_ops import engine_accounting, merge_float_layers

    n_rounds, reps_b1, reps_b32 = SETTINGS[mode][3:]
    stage = "load"
    try:
        zm, calib, x = load(name, mode)
        kind = output_kind(name)
        stage = "lowbit quantize/export"
        qmodel, fp32, int8, calib_seconds = run_lowbit(zm, calib, tmp)
        stage = "lowbit measure"
        # as report.json lists them: what prepare_ left in float plus every heavy op ONNX Runtime runs in float
        floats = merge_float_layers(float_layers(qmodel), engine_accounting(int8, THREADS)["float_heavy_ops"])
        counts = kernel_counts(int8)
        ref = outputs(fp32, x)
        sqnr, cos, top1 = scores(ref, outputs(int8, x), kind)
        par = lowbit.check_onnx_parity(qmodel, int8, x, THREADS)
    except Exception as exc:
        raise RuntimeError(one_line(exc, stage)) from exc
    row = {"model": name, "heavy_ops": heavy_op_count(fp32), "int_kernels_lowbit": counts["heavy_int"],
           "sqnr_db": sqnr, "cosine": cos, "top1_agreement": top1, "parity_ok": par.ok,
           "float_ops_reported": len(floats), "parity_fraction": par.fraction_within_step,
           "parity_segment": par.segment,
           "int_kernels_all_lowbit": counts["all_int"], "float_heavy_kernels_lowbit": counts["heavy_float"],
           "graph_captured": bool(getattr(getattr(qmodel, "lowbit_info", None), "traced", False)),
           "float_layers": [f"{f['layer']}: {f['reason']}" for f in floats], "output": kind,
           "calib_samples": sum(len(b) for b in calib), "calib_batches": len(calib), "eval_samples": len(x),
           "lowbit_calib_seconds": calib_seconds}
    ort_path = measure_ort_side(row, fp32, calib, tmp, x, ref, kind)
    files = {"fp32": fp32, "lowbit": int8, **({"ort": ort_path} if ort_path else {})}
    lat = latency_round_robin(files, x, n_rounds, reps_b1, reps_b32)
    for key in ("fp32", "lowbit", "ort"):
        row[f"latency_ms_b1_{key}"], row[f"latency_ms_b32_{key}"] = lat.get(key, (None, None))
    row["latency_rounds"], row["latency_repeats"] = n_rounds, {"b1": reps_b1, "b32": reps_b32}
    return row


def worker(name: str, mode: str, out: Path) -> None:
    """Measure one model and write its row (or an ``error`` row) as JSON to ``out``."""
    import torch

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"lowbit-bench-zoo-{name}-") as tmp:
        try:
            row = bench_model(name, mode, Path(tmp))
        except Exception as exc:
            row = {"model": name, "error": str(exc) if isinstance(exc, RuntimeError) else one_line(exc, "bench")}
    row["model_seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(row, default=str))


# ---------------------------------------------------------------------------------------------- driver
def run_worker(name: str, mode: str, tmp: Path) -> dict:
    """Run :func:`worker` for ``name`` in a fresh interpreter; a crash or timeout becomes an ``error`` row."""
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--mode", mode, "--out", str(out)]
    # ORT's quant_pre_process / quantize_static leave files in the working directory (sym_shape_infer_temp.onnx,
    # <uuid>.data): run the worker inside the temporary folder, with PYTHONPATH made absolute for it
    env = dict(os.environ)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    work = tmp / f"{name}-cwd"
    work.mkdir()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=work, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"worker: timed out after {WORKER_TIMEOUT_S} s"}
    if out.is_file():
        return json.loads(out.read_text())
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "error": f"worker: exit {proc.returncode}: {tail[:300]}"}


def report(row: dict) -> None:
    if "error" in row:
        say(f"{row['model']:20s} ERROR {row['error']}")
        return

    def ms(key: str) -> str:
        return "   -   " if row.get(key) is None else f"{row[key]:7.4g}"

    top1 = "  -  " if row["top1_agreement"] is None else f"{row['top1_agreement']:.3f}"
    say(f"{row['model']:20s} heavy {row['heavy_ops']:3d} int lowbit {row['int_kernels_lowbit']:3d} "
        f"ort {row.get('int_kernels_ort')!s:>4} | b1 {ms('latency_ms_b1_fp32')} {ms('latency_ms_b1_lowbit')} "
        f"{ms('latency_ms_b1_ort')} | b32 {ms('latency_ms_b32_fp32')} {ms('latency_ms_b32_lowbit')} "
        f"{ms('latency_ms_b32_ort')} | sqnr {row['sqnr_db']:6.1f} cos {row['cosine']:.4f} top1 {top1} "
        f"parity {row['parity_ok']} float {row['float_ops_reported']}")


def main(argv: list[str] | None = None) -> list[dict]:
    from lowbit.zoo import REFERENCE_ZOO

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(REFERENCE_ZOO + EXTRA_MODELS),
                        help="comma-separated zoo model names (default: the reference zoo + efficientnet-lite0, "
                             "digits-cnn)")
    parser.add_argument("--quick", action="store_true",
                        help="16 calibration samples (batches of 8), 32 evaluation inputs, 5 batch-1 / 2 batch-32 "
                             "repeats per round (default: 64 / 16, 128, 20 / 5)")
    parser.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads (default 2; other counts write zoo_threads<N>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.mode, args.out)
        return []
    global THREADS
    THREADS = args.threads
    os.environ["LOWBIT_ZOO_THREADS"] = str(args.threads)  # inherited by the worker processes
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    from lowbit.zoo import MODEL_NAMES

    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODEL_NAMES)}")
    mode = "quick" if args.quick else "full"
    flags = cpu_flags()
    listed = ", ".join(f"{flag}={'yes' if have else 'no'}" for flag, have in flags.items())
    say(f"CPU flags: {listed}; ONNX Runtime intra-op threads {THREADS}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-zoo-") as tmp:
        for name in names:
            row = run_worker(name, mode, Path(tmp))
            report(row)
            rows.append(row)
    total = time.perf_counter() - t0
    say(f"total {total:.0f} s")
    common = {**stamp(), "mode": mode, "threads": THREADS, "cpu_flags": flags,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "run_seconds": total}
    ordered = []
    for row in rows:
        out = {k: row.get(k) for k in KEYS}
        out.update({k: v for k, v in row.items() if k not in KEYS}, **common)
        ordered.append(out)
    full_set = set(names) >= set(REFERENCE_ZOO + EXTRA_MODELS)
    name = "zoo" if full_set else "zoo_partial"  # a subset never overwrites the whole table
    write_results(name if THREADS == 2 else f"zoo_threads{THREADS}", ordered)
    return ordered


if __name__ == "__main__":
    main()
