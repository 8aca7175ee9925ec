"""The pipeline's steps on the CPU beside CUDA: EfficientNet-Lite0, 64 calibration images (issue 15).

Rows ``{step, device, seconds, metric}`` (plus the machine stamp, CPU flags, GPU name, torch / CUDA versions):

* ``calibrate``: ``lowbit.quantize`` with the ``int8`` preset (prepare, BN folding, percentile calibration,
  convert), no pass.
* ``gptq+bias_correction`` / ``adaround+bias_correction``: the same with those passes (they see
  ``PASS_BATCHES`` calibration batches, as ``bench/recovery.py``).
* ``analyze``: ``lowbit.analyze`` on the calibration images (quantization included; sensitivity sweeps capped at
  ``ANALYZE_BUDGET_S``).
* ``qat_epoch``: one QAT epoch (PTQ start, distillation from FP32 with KL, AdamW lr 1e-5, batch 16) over the
  calibration images; calibration is not counted.

``metric`` is the top-1 agreement with FP32 of the quantized model's simulation on the evaluation views (after the
epoch for ``qat_epoch``; ``analyze``: its own whole-model agreement). ``seconds`` is wall time, the GPU
synchronised before the clock stops; a first forward pass warms each device up beforehand. Without CUDA the cuda
rows are written with ``seconds`` and ``metric`` null and ``skipped`` giving the reason.

Usage: ``.venv/bin/python bench/gpu.py [--quick] [--devices cpu,cuda] [--steps calibrate,...]``; writes
``bench/results/gpu.json`` (``gpu_quick.json`` with ``--quick``: 8 calibration and 16 evaluation images, one
pass batch; a smoke run, not figures to compare).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/RESULTS.md: spin-waiting threads on a busy machine

import argparse  # noqa: E402
import copy  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import CPU_FLAGS, stamp, write_results  # noqa: E402
from _common import cpu_flag_list as cpu_flags  # noqa: E402

MODEL = "efficientnet-lite0"
N_CALIB, N_EVAL, PASS_BATCHES = 64, 64, 2
QUICK_CALIB, QUICK_EVAL, QUICK_PASS_BATCHES = 8, 16, 1
ANALYZE_BUDGET_S = 30.0
STEPS = ("calibrate", "gptq+bias_correction", "adaround+bias_correction", "analyze", "qat_epoch")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def device_facts(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        facts.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return facts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement(model, eval_x: torch.Tensor, ref: torch.Tensor, device: torch.device) -> float:
    from lowbit.analysis import metrics

    with torch.no_grad():
        out = torch.cat([model(x.to(device)).float().cpu() for x in eval_x.split(32)])
    return metrics.top1_agreement(ref, out)


class Bench:
    """The model, data and FP32 reference shared by every step."""

    def __init__(self, quick: bool) -> None:
        from lowbit import zoo
        from lowbit.transforms.recipe import load_recipe

        zm = zoo.load_model(MODEL)
        zd = zoo.load_data("photos", n_calib=QUICK_CALIB if quick else N_CALIB, n_eval=QUICK_EVAL if quick else N_EVAL)
        self.model, self.example = zm.model.eval(), zm.example_input
        self.calib, self.eval_x = zd.calib, zd.eval_inputs
        self.pass_batches = QUICK_PASS_BATCHES if quick else PASS_BATCHES
        self.recipe = load_recipe("int8")
        with torch.no_grad():
            self.ref = torch.cat([self.model(x) for x in self.eval_x.split(32)])

    def quantize(self, device: torch.device, passes: tuple[str, ...] = ()) -> float:
        import lowbit

        recipe = self.recipe.with_passes(*passes) if passes else self.recipe
        q = lowbit.quantize(self.model, self.calib, recipe, self.example, show_progress=False,
                            pass_batches=self.pass_batches, device=device)
        return agreement(q, self.eval_x, self.ref, device)

    def analyze(self, device: torch.device) -> float:
        from lowbit.analysis import analyze

        result = analyze(self.model, self.calib, self.recipe, self.example, budget_seconds=ANALYZE_BUDGET_S,
                         batch_size=8, device=device)
        return result.metric_fp32_vs_quant

    def qat_epoch(self, device: torch.device) -> tuple[float, float]:
        """(seconds of the epoch alone, metric after it)."""
        from lowbit import qat
        from lowbit.qat.train import TrainConfig, train_qat

        teacher = copy.deepcopy(self.model).to(device)
        prepared = qat.prepare_qat_(copy.deepcopy(self.model).to(device), self.recipe, self.example,
                                    qat.QATConfig(freeze_bn_step=0), from_ptq=True, calib_data=self.calib)
        config = TrainConfig(epochs=1, batch_size=16, lr=1e-5, distill="kl", schedule="constant")
        sync(device)
        t0 = time.perf_counter()
        train_qat(prepared, self.calib, None, teacher, config)
        sync(device)
        seconds = time.perf_counter() - t0
        return seconds, agreement(qat.convert_(prepared), self.eval_x, self.ref, device)


def _timed(fn: Callable[[], float], device: torch.device) -> tuple[float, float]:
    sync(device)
    t0 = time.perf_counter()
    metric = fn()
    sync(device)
    return time.perf_counter() - t0, metric


def run_step(bench: Bench, step: str, device: torch.device) -> tuple[float, float]:
    """``(seconds, metric)`` of one step on ``device``."""
    if step == "calibrate":
        return _timed(lambda: bench.quantize(device), device)
    if step in ("gptq+bias_correction", "adaround+bias_correction"):
        return _timed(lambda: bench.quantize(device, tuple(step.split("+"))), device)
    if step == "analyze":
        return _timed(lambda: bench.analyze(device), device)
    if step == "qat_epoch":
        return bench.qat_epoch(device)
    raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")


def warm_up(bench: Bench, device: torch.device) -> None:
    """One forward pass (CUDA context, cuDNN autotuning) outside every timing."""
    model = copy.deepcopy(bench.model).to(device)
    with torch.no_grad():
        model(bench.calib[:8].to(device))
    sync(device)


def rows_for(bench: Bench, device_name: str, steps: list[str]) -> list[dict]:
    if device_name == "cuda" and not torch.cuda.is_available():
        say("cuda: skipped (CUDA not available)")
        return [{"step": s, "device": "cuda", "seconds": None, "metric": None, "skipped": "CUDA not available"}
                for s in steps]
    device = torch.device(device_name)
    warm_up(bench, device)
    rows = []
    for step in steps:
        seconds, metric = run_step(bench, step, device)
        say(f"{device_name} {step}: {seconds:.1f} s, top-1 agreement {metric:.4f}")
        rows.append({"step": step, "device": device_name, "seconds": round(seconds, 3), "metric": round(metric, 6),
                     **device_facts(device)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 calibration / 16 evaluation images, one pass batch")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda (default both)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    print(f"CPU flags: {', '.join(cpu_flags()) or 'none of ' + ', '.join(CPU_FLAGS)}", flush=True)
    torch.manual_seed(0)
    bench = Bench(args.quick)
    rows = []
    for device_name in [d.strip() for d in args.devices.split(",") if d.strip()]:
        rows += rows_for(bench, device_name, steps)
    extra = {"model": MODEL, "calib_images": len(bench.calib), "eval_images": len(bench.eval_x),
             "pass_batches": bench.pass_batches, "quick": args.quick, "cpu_flags": cpu_flags(), **stamp()}
    rows = [{**r, **extra} for r in rows]
    write_results("gpu_quick" if args.quick else "gpu", rows)
    return rows


if __name__ == "__main__":
    main()
