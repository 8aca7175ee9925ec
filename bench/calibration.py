"""Calibration cost: lowbit's streaming observers beside ONNX Runtime's calibrators, same tensors, same images.

Model: EfficientNet-Lite0 (lowbit zoo). Tensors: the INPUT of every nn.Conv2d / nn.Linear (50 tensors; in the
FP32 ONNX the first input of every Conv / Gemm node, the same 50 tensors). Images: the zoo's calibration views
(64 for every configuration, then 256 for lowbit minmax / entropy and ORT MinMax / Entropy to show how memory
grows; ``--all-256`` repeats every configuration), fed in batches of 16.

* lowbit: forward pre-hooks on the float PyTorch model call ``observer.update(x)`` for every tensor; after the
  last batch every observer computes uint8 asymmetric per-tensor qparams (``compute_qparams``).
* ONNX Runtime: ``create_calibrator`` on the FP32 ONNX with the CalibrationMethod's defaults as
  ``quantize_static`` users get them, restricted to the same 50 tensors (its ``select_tensors_to_calibrate``
  filtered), the same images through a ``CalibrationDataReader``; timed ``collect_data`` + ``compute_data`` +
  ``compute_scale_zp`` (uint8 asymmetric, what ``quantize_static`` does for QUInt8 activations).

Each configuration runs in a fresh subprocess (this script with ``--worker``). The RSS high-water mark is reset
(``/proc/self/clear_refs``) after setup (imports, model, session), so ``peak_rss_mb`` is the process's peak RSS
*during calibration* (absolute, including the baseline, which is reported as ``baseline_rss_mb``).
Images are read batch by batch from a raw float32 file, so holding the data set costs no memory in any row.

``seconds`` is the wall time of the whole calibration (forward passes included: PyTorch eager for lowbit,
ONNX Runtime for ORT); ``forward_seconds`` is the part spent in the model's forward passes and
``stats_seconds = seconds - forward_seconds`` the calibrator's own cost (statistics + qparams).

Torch workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (see ``OMP_WAIT_POLICY`` below).

Usage: ``.venv/bin/python bench/calibration.py [--quick] [--all-256]``; writes ``bench/results/calibration.json``
(``calibration_quick.json`` with ``--quick``: 64x64 views, 4 and 8 images, so a smoke run never overwrites the
full figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import peak_rss_mb, reset_peak_rss, rss_mb, stamp, write_results  # noqa: E402

BATCH = 16
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine the default spin-wait makes every small
# torch op wait for a descheduled thread (measured here: 50 histogram updates 5.6 s with the default, 0.06 s passive)
OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
LOWBIT_CALIBRATORS = ("minmax", "ema", "meanstd", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
# create_calibrator's defaults in onnxruntime 1.32 (what quantize_static users get without extra_options)
ORT_DEFAULTS = {
    "MinMax": "ORT defaults: symmetric=False, moving_average=False, max_intermediate_outputs=None",
    "Entropy": "ORT defaults: num_bins=128, num_quantized_bins=128, symmetric=False (signed histogram)",
    "Percentile": "ORT defaults: num_bins=2048, percentile=99.999, symmetric=True (|x| histogram)",
}
LOWBIT_CONFIG = {
    "minmax": "running min/max",
    "ema": "EMA min/max, momentum=0.01",
    "meanstd": "mean +- k*std",
    "percentile": "exact mergeable histogram, bins=2048, percentile=99.99",
    "entropy": "exact mergeable histogram, bins=2048, TensorRT KL rule (n_q from the uint8 spec)",
    "mse": "exact mergeable histogram, bins=2048, MSE rule over 256 clip ratios",
}


# ---------------------------------------------------------------------------------------------- data file
def read_batch(path: str, index: int, batch: int, shape: list[int], n_images: int):
    """Images ``[index*batch, ...)`` from the raw float32 file (a fresh array; nothing stays mapped)."""
    import numpy as np

    per_image = shape[0] * shape[1] * shape[2]
    start = index * batch
    count = min(batch, n_images - start)
    arr = np.fromfile(path, dtype=np.float32, count=count * per_image, offset=start * per_image * 4)
    return arr.reshape(count, *shape)


def n_batches(n_images: int, batch: int) -> int:
    return -(-n_images // batch)


# ---------------------------------------------------------------------------------------------- workers
def worker_lowbit(cfg: dict) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(2)
    from lowbit.core import PerTensor, QuantSpec
    from lowbit.observers import make_observer
    from lowbit.zoo.efficientnet import load_efficientnet_lite0

    model = load_efficientnet_lite0().eval()
    calibrator = cfg["calibrator"]
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator=calibrator)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    observers = {n: make_observer(calibrator, name=n) for n, _ in targets}
    stats_time = [0.0]

    def make_hook(obs):
        def hook(_module, args):
            t0 = time.perf_counter()
            obs.update(args[0])
            stats_time[0] += time.perf_counter() - t0

        return hook

    handles = [m.register_forward_pre_hook(make_hook(observers[n])) for n, m in targets]
    baseline = rss_mb()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n_batches(cfg["images"], BATCH)):
            x = torch.from_numpy(read_batch(cfg["data"], i, BATCH, cfg["shape"], cfg["images"]))
            model(x)
    t1 = time.perf_counter()
    qparams = {n: obs.compute_qparams(spec) for n, obs in observers.items()}
    t2 = time.perf_counter()
    for h in handles:
        h.remove()
    assert len(qparams) == len(targets)
    scales = torch.stack([s.reshape(()) for s, _ in qparams.values()])
    return {
        "seconds": t2 - t0,
        "forward_seconds": (t1 - t0) - stats_time[0],
        "qparams_seconds": t2 - t1,
        "tensors": len(qparams),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "peak_reset": reset_ok,
        "median_scale": float(scales.median()),
    }


class _TimedSession:
    """Proxy of an InferenceSession that adds the time spent in ``run`` to a counter."""

    def __init__(self, session, counter: list[float]) -> None:
        self._session, self._counter = session, counter

    def run(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._counter[0] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._session, name)


def conv_input_names(onnx_path: str) -> list[str]:
    """First input of every Conv / Gemm / MatMul node, in graph order, without repeats."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[0] not in names:
            names.append(node.input[0])
    return names


def worker_ort(cfg: dict) -> dict:
    import numpy as np
    import onnxruntime.quantization.calibrate as ortcal
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    wanted = set(conv_input_names(cfg["onnx"]))
    original_select = ortcal.CalibraterBase.select_tensors_to_calibrate

    def select_same_tensors(self, model):
        tensors, value_infos = original_select(self, model)
        return {t for t in tensors if t in wanted}, value_infos

    ortcal.CalibraterBase.select_tensors_to_calibrate = select_same_tensors

    class Reader(ortcal.CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= n_batches(cfg["images"], BATCH):
                return None
            x = read_batch(cfg["data"], self.i, BATCH, cfg["shape"], cfg["images"])
            self.i += 1
            return {"input": x}

    method = getattr(ortcal.CalibrationMethod, cfg["calibrator"])
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = ortcal.create_calibrator(
            Path(cfg["onnx"]), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=method, extra_options={},
        )
        forward = [0.0]
        calibrator.infer_session = _TimedSession(calibrator.infer_session, forward)
        tensors = len(calibrator.tensors_to_calibrate) if hasattr(calibrator, "tensors_to_calibrate") else None
        baseline = rss_mb()
        reset_ok = reset_peak_rss()
        t0 = time.perf_counter()
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
        qmin, qmax = get_qmin_qmax_for_qType(TensorProto.UINT8)
        qparams = {}
        for name in ranges:
            lo, hi = ranges[name].range_value
            qparams[name] = compute_scale_zp(np.asarray(lo, np.float32), np.asarray(hi, np.float32), qmin, qmax, False)
        t1 = time.perf_counter()
        peak = peak_rss_mb()
    scales = np.array([float(np.asarray(s).ravel()[0]) for _, s in qparams.values()])
    return {
        "seconds": t1 - t0,
        "forward_seconds": forward[0],
        "tensors": len(qparams) if tensors is None else tensors,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_reset": reset_ok,
        "median_scale": float(np.median(scales)),
    }


def run_worker(cfg: dict) -> dict:
    """Run one configuration in a fresh Python process; returns its result dict (or an ``error``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_seconds"] = wall
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited {proc.returncode}: {' | '.join(tail)}", "process_seconds": wall}


# ---------------------------------------------------------------------------------------------- parent
def available_mb() -> float:
    """``MemAvailable`` from /proc/meminfo in MiB (inf when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def prepare_inputs(tmp: Path, max_images: int, size: int) -> tuple[str, str, list[int]]:
    """Write the calibration views (raw float32) and the FP32 ONNX of EfficientNet-Lite0 into ``tmp``."""
    import torch

    from _common import export_fp32_onnx
    from lowbit.zoo.efficientnet import load_efficientnet_lite0
    from lowbit.zoo.photos import photo_views

    views = photo_views("calib", max_images, seed=0, size=size).contiguous()
    data = tmp / "views.f32"
    views.numpy().astype("float32").tofile(data)
    onnx_path = tmp / "efficientnet_lite0_fp32.onnx"
    export_fp32_onnx(load_efficientnet_lite0(), views[:1].clone(), onnx_path)
    del torch
    return str(data), str(onnx_path), list(views.shape[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 96x96 views, 8 and 16 images, 4 configs")
    parser.add_argument("--all-256", action="store_true", help="run every configuration at 256 views too (slow)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        result = worker_lowbit(cfg) if cfg["tool"] == "lowbit" else worker_ort(cfg)
        print("RESULT " + json.dumps(result), flush=True)
        return [result]

    if args.quick:
        size, image_counts = 64, (4, 8)
        plan = {4: [("lowbit", "minmax"), ("lowbit", "entropy"), ("onnxruntime", "MinMax"), ("onnxruntime", "Entropy")],
                8: [("lowbit", "entropy"), ("onnxruntime", "Entropy")]}
    else:
        size, image_counts = 224, (64, 256)
        first = [("lowbit", c) for c in LOWBIT_CALIBRATORS] + [("onnxruntime", m) for m in ORT_METHODS]
        # the 256-view pass is about memory: lowbit's cheapest and its entropy calibrator beside ORT's two
        # (--all-256 runs every configuration again, which takes well over 10 minutes on 2 busy cores)
        second = first if args.all_256 else [("lowbit", "minmax"), ("lowbit", "entropy"), ("onnxruntime", "MinMax"),
                                              ("onnxruntime", "Entropy")]
        plan = {64: first, 256: second}

    rows: list[dict] = []
    seen: dict[tuple[str, str], dict] = {}
    common = stamp()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-calib-") as tmpdir:
        data, onnx_path, shape = prepare_inputs(Path(tmpdir), max(image_counts), size)
        for images in image_counts:
            for tool, calibrator in plan[images]:
                cfg = {"tool": tool, "calibrator": calibrator, "images": images, "data": data, "onnx": onnx_path,
                       "shape": shape}
                prev = seen.get((tool, calibrator))
                projected = None
                if prev and "peak_rss_mb" in prev and "baseline_rss_mb" in prev:
                    growth = max(prev["peak_rss_mb"] - prev["baseline_rss_mb"], 0.0)
                    projected = prev["baseline_rss_mb"] + growth * images / prev["images"]
                if projected is not None and projected > 0.75 * available_mb():
                    res = {"error": f"skipped: projected peak {projected:.0f} MiB > 75% of the "
                                    f"{available_mb():.0f} MiB available (linear in images from the "
                                    f"{prev['images']}-image run)"}
                else:
                    res = run_worker(cfg)
                    seen.setdefault((tool, calibrator), dict(res, images=images))
                config = LOWBIT_CONFIG[calibrator] if tool == "lowbit" else ORT_DEFAULTS[calibrator]
                config += f"; uint8 asymmetric per-tensor qparams; batch {BATCH}; {shape[1]}x{shape[2]} views"
                if tool == "onnxruntime":
                    config += "; tensors restricted to the 50 Conv/Gemm inputs; ORT forward (opt. level DISABLE_ALL)"
                else:
                    config += "; forward pre-hooks on the float PyTorch model (eager)"
                row = {"tool": tool, "calibrator": calibrator, "images": images, "seconds": res.get("seconds"),
                       "peak_rss_mb": res.get("peak_rss_mb"), "tensors": res.get("tensors"), "config": config}
                for key in ("forward_seconds", "baseline_rss_mb", "qparams_seconds", "median_scale",
                            "process_seconds", "error"):
                    if key in res:
                        row[key] = res[key]
                if row["seconds"] is not None and "forward_seconds" in res:
                    row["stats_seconds"] = res["seconds"] - res["forward_seconds"]
                row.update(common)
                rows.append(row)
                print(f"# {tool:11s} {calibrator:10s} {images:4d} images: "
                      + (f"{row['seconds']:.2f} s (stats {row.get('stats_seconds', float('nan')):.2f} s), "
                         f"peak {row['peak_rss_mb']:.0f} MiB" if "error" not in res else res["error"]),
                      file=sys.stderr, flush=True)
    print(f"# total {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
    write_results("calibration_quick" if args.quick else "calibration", rows)
    return rows


if __name__ == "__main__":
    main()
