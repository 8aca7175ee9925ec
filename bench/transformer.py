"""Transformers: lowbit dynamic / static / weight-only quantization of MiniLM beside ONNX Runtime and torch.ao.

Model and data (lowbit zoo): ``minilm-l6`` (all-MiniLM-L6-v2, mean pooling + L2 normalisation, token ids
``[N, 64]``) on ``sentences`` (English sentences of ``pydoc_data.topics``; 128 calibration and 256 evaluation
sentences, disjoint; ``--quick``: 32 and 64). Calibration batches are sorted by length and trimmed to their
longest sentence (``zoo.sentences.length_batches``); evaluation uses the padded ids.

Rows (same FP32 ONNX, same sentences):

* FP32: the float model exported once (TorchScript exporter, opset 17), run on ONNX Runtime; its embeddings
  are the reference of every ``cosine`` (mean row-wise cosine similarity) and ``nn_agreement`` (share of
  evaluation sentences whose nearest other sentence is the same as with FP32).
* lowbit dynamic int8 (``quantize_dynamic_`` + ``export_dynamic_onnx``): weights int8 symmetric per channel
  (7-bit on CPUs without VNNI, see README), activations uint8 at run time per token (and per tensor).
  Every lowbit row also stores the word-embedding table as int8 per row (``quantize_embeddings_``), as ONNX
  Runtime's ``quantize_dynamic`` does with its Gather.
  Also per tensor after SmoothQuant (α = ``--alpha``), which needs the calibration sentences for its maxima.
* lowbit static W8A8 (``prepare_`` → ``calibrate`` (MinMax) → ``convert_``, residual adds kept float; inputs of
  every Linear and of both attention matmuls quantized; Softmax / LayerNorm / GELU float), without and with
  SmoothQuant (``ptq.smoothquant``, α given by ``--alpha``); exported as Q/DQ.
* lowbit W4 g128 weight-only, round-to-nearest and GPTQ (``lowbit.ptq.gptq``), exported as ``MatMulNBits``.
* ONNX Runtime ``quantize_dynamic`` on the FP32 ONNX: defaults (per-tensor int8 weights) and per_channel=True.
* torch.ao ``quantize_dynamic`` (qint8 Linear) run in PyTorch (a failure becomes a row with ``error``).

Latency: median ``session.run`` (CPU EP, 2 intra-op threads, full optimisation) at batch 1 and 32, every ONNX file
measured in interleaved rounds (a fresh session per round); torch.ao in PyTorch with ``torch.set_num_threads(2)``.
``size_bytes``: the ONNX file (torch.ao: its serialized state_dict).

Usage: ``.venv/bin/python bench/transformer.py [--quick] [--alpha A]``; writes ``bench/results/transformer.json``
(``transformer_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/ptq.py: idle OpenMP threads must not spin

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import stamp, write_results  # noqa: E402

THREADS = 2
EVAL_BATCH = 32


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


class Bench:
    """Shared state: model, data, FP32 reference, temporary folder, rows."""

    def __init__(self, quick: bool, tmp: Path) -> None:
        from lowbit.zoo import load_data, load_model
        from lowbit.zoo.sentences import length_batches

        self.quick, self.tmp = quick, tmp
        self.zm = load_model("minilm-l6")
        zd = load_data("sentences", n_calib=32 if quick else 128, n_eval=64 if quick else 256)
        self.calib, self.x = length_batches(zd.calib), zd.eval_inputs
        self.rows: list[dict] = []
        self.ref: torch.Tensor | None = None

    def engine_outputs(self, path: Path) -> torch.Tensor:
        from lowbit.export.onnx_dynamic import run_onnx_batched
        from lowbit.export.runtime import make_session

        return run_onnx_batched(make_session(path, THREADS), self.x, EVAL_BATCH)

    def scores(self, out: torch.Tensor) -> dict:
        from lowbit.analysis.embedding_metrics import mean_cosine, nn_agreement

        return {"cosine": mean_cosine(self.ref, out), "nn_agreement": nn_agreement(self.ref, out)}

    def sim_scores(self, model) -> dict:
        with torch.no_grad():
            sim = torch.cat([model(b) for b in self.x.split(EVAL_BATCH)])
        return {f"sim_{k}": v for k, v in self.scores(sim).items()}

    def add_onnx(self, config: str, tool: str, path: Path, seconds: float, model=None, **extra) -> None:
        from lowbit.export.runtime import optimized_op_types

        row = {"config": config, "tool": tool, **self.scores(self.engine_outputs(path)), "size_bytes": path.stat().st_size,
               "quantize_seconds": round(seconds, 2), **extra}
        if model is not None:
            row.update(self.sim_scores(model))
        ops = optimized_op_types(path, THREADS)
        row["integer_kernels"] = {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS}
        row["_onnx"] = path
        self.rows.append(row)
        say(f"{config} ({tool}): cosine {row['cosine']:.5f}, nn {row['nn_agreement']:.4f}, {row['size_bytes']:,} B")


INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
               "MatMulNBits", "DynamicQuantizeLinear", "QAttention", "QuantizeLinear", "DequantizeLinear")


def run_fp32(b: Bench) -> Path:
    from lowbit.export.onnx_dynamic import export_dynamic_onnx

    path = b.tmp / "fp32.onnx"
    export_dynamic_onnx(b.zm.model, b.zm.example_input, path, check_parity=False)
    b.ref = b.engine_outputs(path)
    with torch.no_grad():
        torch_ref = torch.cat([b.zm.model(x) for x in b.x.split(EVAL_BATCH)])
    b.add_onnx("FP32", "onnxruntime", path, 0.0, torch_max_abs_diff=float((torch_ref - b.ref).abs().max()))
    return path


def run_dynamic(b: Bench, per_token: bool, alpha: float | None = None) -> None:
    from lowbit.export.onnx_dynamic import export_dynamic_onnx
    from lowbit.ptq.smoothquant import SmoothQuantConfig, smooth_
    from lowbit.transforms.dynamic import dynamic_recipe, quantize_dynamic_

    recipe = dynamic_recipe(per_token=per_token).for_machine()
    t0 = time.perf_counter()
    model = copy.deepcopy(b.zm.model)
    if alpha is not None:  # SmoothQuant needs the calibration sentences (activation maxima per channel)
        model = smooth_(model, b.calib, SmoothQuantConfig(alpha=alpha))
    q = quantize_dynamic_(model, recipe)
    seconds = time.perf_counter() - t0
    path = b.tmp / f"lowbit_dynamic_{'token' if per_token else 'tensor'}{'_sq' if alpha is not None else ''}.onnx"
    export_dynamic_onnx(q, b.zm.example_input, path, check_parity=False)
    mode = "per-token" if per_token else "per-tensor"
    config = f"dynamic int8 ({mode} activations)" + (f" + SmoothQuant α={alpha}" if alpha is not None else "")
    b.add_onnx(config, "lowbit", path, seconds, model=q, weight_bits=recipe.default_weight.bits)


def static_recipe():
    import lowbit

    return lowbit.preset("int8").with_calibrator("minmax").keep_float("type:add").for_machine()


def run_static(b: Bench, alpha: float | None) -> None:
    import lowbit
    from lowbit.ptq.smoothquant import SmoothQuantConfig, smooth_
    from lowbit.transforms.dynamic import quantize_embeddings_

    t0 = time.perf_counter()
    model = copy.deepcopy(b.zm.model)
    if alpha is not None:
        model = smooth_(model, b.calib, SmoothQuantConfig(alpha=alpha))
    q = lowbit.quantize(model, b.calib, static_recipe(), b.zm.example_input, show_progress=False)
    quantize_embeddings_(q)
    seconds = time.perf_counter() - t0
    path = b.tmp / f"lowbit_static_{'sq' if alpha is not None else 'plain'}.onnx"
    lowbit.export_onnx(q, b.zm.example_input, path, check_parity=False)
    config = "static W8A8 (MinMax)" + (f" + SmoothQuant α={alpha}" if alpha is not None else "")
    b.add_onnx(config, "lowbit", path, seconds, model=q, weight_bits=static_recipe().default_weight.bits)


def w4_recipe(group: int):
    from lowbit import LayerRule, PerGroup, QuantSpec, Recipe
    from lowbit.transforms.recipe import UINT8_ACT

    w4 = QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerGroup(group, axis=1), calibrator="minmax")
    return Recipe(w4, UINT8_ACT, rules=(LayerRule("re:.*", w4, None),))


def run_w4(b: Bench, gptq: bool, group: int = 128) -> None:
    import lowbit
    from lowbit.export.onnx_matmul_nbits import export_nbits_onnx
    from lowbit.transforms.dynamic import quantize_embeddings_

    t0 = time.perf_counter()
    q = lowbit.quantize(b.zm.model, b.calib[:1], w4_recipe(group), b.zm.example_input, show_progress=False)
    if gptq:
        from lowbit.ptq import gptq as gptq_pass

        gptq_pass.apply(q, b.calib)
    quantize_embeddings_(q)
    seconds = time.perf_counter() - t0
    path = b.tmp / f"lowbit_w4_g{group}_{'gptq' if gptq else 'rtn'}.onnx"
    export_nbits_onnx(q, b.zm.example_input, path)
    b.add_onnx(f"W4 g{group} weight-only, {'GPTQ' if gptq else 'RTN'}", "lowbit", path, seconds, model=q)


def run_ort_dynamic(b: Bench, fp32: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = b.tmp / f"ort_dynamic_pc{int(per_channel)}.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(fp32), str(path), per_channel=per_channel, weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - t0
    b.add_onnx(f"quantize_dynamic (QInt8, per_channel={per_channel})", "onnxruntime", path, seconds)


def run_torch_ao(b: Bench) -> None:
    torch.set_num_threads(THREADS)
    try:
        from torch.ao.quantization import quantize_dynamic

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_dynamic(copy.deepcopy(b.zm.model), {torch.nn.Linear}, dtype=torch.qint8)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = torch.cat([q(x) for x in b.x.split(EVAL_BATCH)])
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        reps = (3, 1) if b.quick else (10, 3)
        row = {"config": "quantize_dynamic (qint8 Linear, x86 default qconfig)", "tool": "torch.ao", **b.scores(out),
               "latency_ms_b1": torch_latency_ms(q, b.x[:1], reps[0]), "latency_ms_b32": torch_latency_ms(q, b.x[:EVAL_BATCH], reps[1]),
               "size_bytes": len(buf.getvalue()), "quantize_seconds": round(seconds, 2), "runtime": "PyTorch"}
    except Exception as exc:  # noqa: BLE001 — a tool that does not run is a row, not a crash
        row = {"config": "quantize_dynamic (qint8 Linear)", "tool": "torch.ao", "error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    b.rows.append(row)


def torch_latency_ms(model, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def latency_round_robin(b: Bench, rounds: int, reps_b1: int, reps_b32: int) -> None:
    """Fill ``latency_ms_b1`` / ``latency_ms_b32`` of every ONNX row, measured in interleaved rounds."""
    import numpy as np

    from lowbit.export.runtime import make_session

    feeds = (b.x[:1].numpy().astype(np.int64), b.x[:EVAL_BATCH].numpy().astype(np.int64))
    rows = [r for r in b.rows if "_onnx" in r]
    samples = {id(r): ([], []) for r in rows}
    for _ in range(rounds):
        for r in rows:
            session = make_session(r["_onnx"], THREADS)
            name = session.get_inputs()[0].name
            for feed, reps, warm, out in ((feeds[0], reps_b1, 3, samples[id(r)][0]), (feeds[1], reps_b32, 1, samples[id(r)][1])):
                for _ in range(warm):
                    session.run(None, {name: feed})
                for _ in range(reps):
                    t0 = time.perf_counter()
                    session.run(None, {name: feed})
                    out.append((time.perf_counter() - t0) * 1e3)
            del session
    for r in rows:
        r["latency_ms_b1"] = statistics.median(samples[id(r)][0])
        r["latency_ms_b32"] = statistics.median(samples[id(r)][1])


def goals(rows: list[dict]) -> dict:
    """The issue's goals, read from the rows (the dynamic goals for every lowbit dynamic configuration)."""
    by = {(r["tool"], r["config"]): r for r in rows if "error" not in r}
    fp32 = by[("onnxruntime", "FP32")]
    ort = max((r for (t, c), r in by.items() if t == "onnxruntime" and c.startswith("quantize_dynamic")),
              key=lambda r: r["cosine"])
    out: dict = {"best_ort_dynamic": ort["config"]}
    for (tool, config), dyn in by.items():
        if tool != "lowbit" or not config.startswith("dynamic"):
            continue
        out[config] = {
            "cosine_ge_0.995": dyn["cosine"] >= 0.995,
            "speedup_b32_vs_fp32": fp32["latency_ms_b32"] / dyn["latency_ms_b32"],
            "speedup_b32_ge_1.8": fp32["latency_ms_b32"] / dyn["latency_ms_b32"] >= 1.8,
            "vs_best_ort_dynamic": {"cosine_ge": dyn["cosine"] >= ort["cosine"],
                                    "latency_b32_le": dyn["latency_ms_b32"] <= ort["latency_ms_b32"],
                                    "latency_b1_le": dyn["latency_ms_b1"] <= ort["latency_ms_b1"]},
        }
    rtn = next(r for (t, c), r in by.items() if t == "lowbit" and c.startswith("W4") and c.endswith("RTN"))
    gptq = next((r for (t, c), r in by.items() if t == "lowbit" and c.startswith("W4") and c.endswith("GPTQ")), None)
    if gptq is not None:
        out["w4_gptq_cosine_ge_0.99"] = gptq["cosine"] >= 0.99
        out["w4_gptq_above_rtn"] = gptq["cosine"] > rtn["cosine"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer repeats, no GPTQ")
    parser.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant migration strength")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(args.quick, Path(tmp))
        fp32 = run_fp32(b)
        for per_token in (True, False):
            run_dynamic(b, per_token)
        run_dynamic(b, False, args.alpha)
        run_static(b, None)
        run_static(b, args.alpha)
        run_w4(b, gptq=False)
        if not args.quick:
            run_w4(b, gptq=True)
        for per_channel in (False, True):
            run_ort_dynamic(b, fp32, per_channel)
        run_torch_ao(b)
        rounds, r1, r32 = (1, 5, 2) if args.quick else (3, 20, 3)
        latency_round_robin(b, rounds, r1, r32)
        rows = [{k: v for k, v in r.items() if k != "_onnx"} for r in b.rows]
    summary = {"config": "goals", "tool": "summary", **goals(rows), "eval_sentences": int(b.x.shape[0]),
               "calib_sentences": int(sum(x.shape[0] for x in b.calib)), "seq_len": int(b.x.shape[1]),
               "threads": THREADS, "bench_seconds": round(time.perf_counter() - t_start, 1)}
    stamped = [{**r, **stamp()} for r in rows + [summary]]
    write_results("transformer_quick" if args.quick else "transformer", stamped)


if __name__ == "__main__":
    main()
