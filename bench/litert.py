"""LiteRT (TFLite) target: lowbit's own quantization vs litert-torch's PT2EQuantizer vs float, on the interpreter.

For each model the same calibration data goes to

* ``lowbit``: recipe ``litert-int8`` → ``lowbit.export.litert.to_tflite`` (float input / output, the default
  float head: the classifier returns float logits); ``lowbit int8 head``: the same with ``head="int8"`` (int8
  logits, every compute op int8, what ``--io int8`` gives apart from the interface);
* ``litert-torch PT2E``: ``torch.export`` → ``prepare_pt2e`` with litert-torch's ``PT2EQuantizer`` (symmetric
  per-channel config, static) → calibration → ``convert_pt2e`` → ``litert_torch.convert`` in static Q/DQ mode;
* ``fp32``: the float model converted by ``litert_torch.convert``.

Every figure comes from the LiteRT interpreter with the XNNPACK delegate: op types and int8 coverage read from
the flatbuffer, top-1 agreement / KL against the FP32 ``.tflite`` on the evaluation inputs, latency at batch 1
with 1 and 2 threads (median of interleaved rounds: one ``invoke`` of each file per round), and for lowbit the
parity of its PyTorch simulation with the interpreter. Writes ``bench/results/litert.json``.

    python bench/litert.py [--quick] [--models efficientnet-lite0,digits-cnn] [--repeats 60]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CPU_FLAGS, stamp, write_results  # noqa: E402
from _common import cpu_flag_list as cpu_flags  # noqa: E402

import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.analysis import metrics  # noqa: E402
from lowbit.export.litert import _convert, _static_quant_config, float_head, require_litert, to_tflite  # noqa: E402
from lowbit.export.litert_flatbuffer import float_interface, op_summary  # noqa: E402
from lowbit.export.litert_runtime import latencies_ms, output_step, predictor  # noqa: E402
from lowbit.report.litert import code_parity  # noqa: E402
from lowbit.zoo import load_data, load_model  # noqa: E402


def pt2e_tflite(model: torch.nn.Module, example: torch.Tensor, calib: torch.Tensor) -> bytes:
    """litert-torch's own PT2E flow: its quantizer places and calibrates the Q/DQ ops, then static conversion."""
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(copy.deepcopy(model).eval(), (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for row in calib:
            prepared(row[None])
    converted = convert_pt2e(prepared, fold_quantize=False)
    return float_interface(_convert(converted, example, _static_quant_config()))


def measure(name: str, files: dict[str, bytes], ref_name: str, x_eval: torch.Tensor, repeats: int) -> dict:
    """Per-file op summary, agreement / KL vs the reference file, and interleaved latency at 1 and 2 threads."""
    outs = {k: predictor(v)(x_eval) for k, v in files.items()}
    ref = outs[ref_name]
    rows = {}
    for k, data in files.items():
        s = op_summary(data)
        rows[k] = {
            "size_bytes": len(data),
            "op_types": dict(s.ops),
            "float_ops": dict(s.float_ops),
            "int8_coverage": s.coverage(),
            "transpose": s.ops.get("TRANSPOSE", 0),
            "pad": s.ops.get("PAD", 0) + s.ops.get("PADV2", 0),
            "requantize": max(0, s.ops.get("QUANTIZE", 0) - 1),
            "float_add": s.float_ops.get("ADD", 0),
            "float_conv": s.float_ops.get("CONV_2D", 0) + s.float_ops.get("DEPTHWISE_CONV_2D", 0),
            "top1_agreement": metrics.top1_agreement(ref, outs[k]),
            "kl": metrics.kl_softmax(ref, outs[k]),
        }
    for threads in (1, 2):
        lat = latencies_ms(files, x_eval, threads=threads, repeats=repeats)
        for k, ms in lat.items():
            rows[k][f"latency_ms_b1_t{threads}"] = ms
    for k in rows:
        for threads in (1, 2):
            rows[k][f"speedup_vs_fp32_t{threads}"] = rows[ref_name][f"latency_ms_b1_t{threads}"] / rows[k][
                f"latency_ms_b1_t{threads}"]
    logging.info("%s: %s", name, {k: (r["top1_agreement"], r["latency_ms_b1_t1"]) for k, r in rows.items()})
    return outs, rows


def parity_figures(q: torch.nn.Module, data: bytes, out: torch.Tensor, x_eval: torch.Tensor) -> dict:
    """Simulation vs interpreter: codes within one step for int8 logits (``code_parity``); for float logits
    (the float head, simulated under ``float_head``) values within one int8-equivalent step ``range / 255``."""
    step = output_step(data)
    with torch.no_grad(), (float_head(q) if step is None else contextlib.nullcontext()):
        sim = torch.cat([q(chunk) for chunk in torch.split(x_eval, 32)])
    par = code_parity(sim, out, step)
    return {"parity_exact_fraction": float(((sim - out).abs() <= par.step * 1e-3).double().mean()),
            "parity_fraction": par.fraction_within_step, "parity_max_abs_diff": par.max_abs_diff,
            "parity_step": par.step, "parity_compared": "int8 codes" if step else "float logits",
            "simulated_top1_agreement": metrics.top1_agreement(out, sim)}


def run_model(name: str, quick: bool, repeats: int) -> list[dict]:
    zm = load_model(name)
    data = load_data(zm.default_data)
    calib, x_eval = data.calib, data.eval_inputs
    if quick:
        calib, x_eval = calib[:16], x_eval[:32]
    example = zm.example_input[:1]
    t0 = time.perf_counter()
    q = lowbit.quantize(copy.deepcopy(zm.model).eval(), calib, lowbit.preset("litert-int8"), example)
    lowbit_float_head = to_tflite(q, example)
    t_lowbit = time.perf_counter() - t0
    lowbit_int8 = to_tflite(q, example, head="int8")
    fp32 = to_tflite(q, example, float_model=True)
    t0 = time.perf_counter()
    pt2e = pt2e_tflite(zm.model, example, calib)
    t_pt2e = time.perf_counter() - t0
    files = {"fp32": fp32, "lowbit": lowbit_float_head, "lowbit int8 head": lowbit_int8, "litert-torch PT2E": pt2e}
    outs, rows = measure(name, files, "fp32", x_eval, repeats)
    for tool, tflite in (("lowbit int8 head", lowbit_int8), ("lowbit", lowbit_float_head)):
        rows[tool].update(parity_figures(q, tflite, outs[tool], x_eval))
    rows["lowbit"]["quantize_convert_seconds"] = t_lowbit
    rows["litert-torch PT2E"]["quantize_convert_seconds"] = t_pt2e
    if data.eval_labels is not None:
        labels = data.eval_labels[: len(x_eval)]
        for k in rows:
            rows[k]["accuracy"] = metrics.accuracy(outs[k], labels)
    return [{"model": name, "tool": k, "calib_samples": int(len(calib)), "eval_samples": int(len(x_eval)),
             "cpu_flags": cpu_flags(), **r, **stamp()} for k, r in rows.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples and repeats (smoke run)")
    parser.add_argument("--models", default="digits-cnn,efficientnet-lite0")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torchao", "litert_torch", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    require_litert()
    print(f"CPU flags: {', '.join(cpu_flags()) or 'none of ' + ', '.join(CPU_FLAGS)}", flush=True)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name.strip(), args.quick, 10 if args.quick else args.repeats)
    write_results("litert", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
