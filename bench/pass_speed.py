"""CPU time of the layer-wise passes: GPTQ + bias correction and AdaRound + bias correction, old code beside new.

Settings of ``bench/recovery.py`` (issue 15's reference): EfficientNet-Lite0, the ``int8`` preset for this
machine, 64 calibration photo views in batches of 16, the passes see 2 batches (32 views). Each row runs in a
fresh process:

* ``code=<rev>``: lowbit as committed at ``--baseline-rev`` (extracted with ``git archive``), the code the
  recovery table's 459 s / 880 s were measured with;
* ``code=worktree, frontier=on``: this checkout, activations kept between layers (``lowbit.ptq.frontier``);
* ``code=worktree, frontier=off``: this checkout with ``memory_budget_mb=0`` (the model re-run up to each layer).

``weights_sha256`` hashes every tensor of the quantized model's state dict: equal hashes mean bit-identical
weights, biases and qparams, hence the same accuracy; ``top1_agreement`` (256 evaluation views, PyTorch
simulation vs FP32) is printed as a check.

Usage: ``PYTHONPATH=src .venv/bin/python bench/pass_speed.py [--baseline-rev 59b60c9] [--quick]``; writes
``bench/results/pass_speed.json`` (``pass_speed_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, cpu_flags, stamp, write_results  # noqa: E402

THREADS = 2
PASS_BATCHES = 2
PASSES = ("gptq+bias_correction", "adaround+bias_correction")


def say(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def worker(spec: dict) -> dict:
    """One quantization in this process (``spec``: passes, quick, memory_budget_mb or None)."""
    import torch

    import lowbit
    from lowbit.ptq.passes import quantize
    from ptq import load

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    zm, data = load("efficientnet-lite0", spec["quick"])
    calib = list(data.calib.split(16 if not spec["quick"] else 4))
    recipe = lowbit.preset("int8").for_machine().with_passes(*spec["passes"].split("+"))
    kwargs = {} if spec["memory_budget_mb"] is None else {"memory_budget_mb": spec["memory_budget_mb"]}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    q = quantize(zm.model, calib, recipe, zm.example_input, show_progress=False, pass_batches=PASS_BATCHES,
                 timings=timings, **kwargs)
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    for key, value in sorted(q.state_dict().items()):
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    with torch.no_grad():
        ref = torch.cat([zm.model(b) for b in data.eval_inputs.split(32)]).argmax(1)
        got = torch.cat([q(b) for b in data.eval_inputs.split(32)]).argmax(1)
    return {"seconds": round(seconds, 2), "pass_seconds": {k: round(v, 2) for k, v in timings.items()},
            "weights_sha256": digest.hexdigest()[:16], "top1_agreement": float((ref == got).float().mean()),
            "peak_rss_mb": round(rss_peak_mb(), 1), "calib_views": len(data.calib), "eval_views": len(data.eval_inputs)}


def rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(src: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_src(rev: str, tmp: Path) -> Path:
    """``src/`` of lowbit at ``rev``, extracted from git into ``tmp``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    return tmp / "src"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default=None, help="git revision to time beside this checkout")
    parser.add_argument("--passes", nargs="+", default=list(PASSES))
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 small views (AdaRound still runs its "
                        "1000 steps per layer, so it is not much quicker)")
    parser.add_argument("--frontier-off-for", nargs="*", default=["gptq+bias_correction"],
                        help="passes also timed with the frontier off (memory_budget_mb=0)")
    parser.add_argument("--tag", default="", help="results file pass_speed_<tag>.json (a re-run beside the main one)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    say(f"CPU flags: {', '.join(f for f, on in cpu_flags().items() if on)}; load {os.getloadavg()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-pass-speed-") as tmp:
        versions = [("worktree", ROOT / "src", "on", None), ("worktree", ROOT / "src", "off", 0)]
        if args.baseline_rev:
            versions.insert(0, (args.baseline_rev, baseline_src(args.baseline_rev, Path(tmp)), "n/a", None))
        for passes in args.passes:
            for code, src, frontier, budget in versions:
                if frontier == "off" and passes not in args.frontier_off_for:
                    continue
                spec = {"passes": passes, "quick": args.quick, "memory_budget_mb": budget}
                row = {"model": "efficientnet-lite0", "passes": passes, "code": code, "frontier": frontier,
                       "pass_batches": PASS_BATCHES, **run_worker(src, spec), "load_avg": os.getloadavg()[0]}
                say(json.dumps(row))
                rows.append(row)
    rows = [{**r, **stamp(), "cpu_flags": cpu_flags()} for r in rows]
    name = "pass_speed_quick" if args.quick else "pass_speed"
    write_results(f"{name}_{args.tag}" if args.tag else name, rows)
    return rows


if __name__ == "__main__":
    main()
