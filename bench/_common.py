"""Helpers shared by the benchmark scripts: machine stamp, results file, peak-RSS probes, FP32 ONNX export.

Kept free of heavy imports (torch, onnxruntime) so that benchmark worker processes only pay for what they use.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def machine() -> str:
    """``lscpu`` model name and core count, e.g. ``"AMD EPYC 9B14, 2 cores"`` (the figure reports carry)."""
    from lowbit.jobs.outputs import machine_description

    return machine_description()


def lowbit_version() -> str:
    """The installed lowbit version without importing the package (and torch with it)."""
    try:
        from importlib.metadata import version

        return version("lowbit")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        return "unknown"


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "avx512_bf16")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` ``/proc/cpuinfo`` lists (all False where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return dict.fromkeys(CPU_FLAGS, False)
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return {flag: flag in have for flag in CPU_FLAGS}


def cpu_flag_list() -> list[str]:
    """The flags of :data:`CPU_FLAGS` this CPU has, in that order."""
    return [flag for flag, on in cpu_flags().items() if on]


def stamp() -> dict:
    """Fields every result row carries."""
    return {"machine": machine(), "date": _dt.date.today().isoformat(), "lowbit_version": lowbit_version()}


def write_results(name: str, rows: list[dict]) -> Path:
    """Write ``bench/results/<name>.json`` (a list of row objects) and print the same JSON last."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    text = json.dumps(rows, indent=2, default=_json_default)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    print(text, flush=True)
    return path


def _json_default(obj):
    try:
        return float(obj)
    except Exception:
        return str(obj)


# ---------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """RSS high-water mark (``VmHWM``) in MiB; falls back to ``ru_maxrss`` (whole process lifetime)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------- ONNX
def export_fp32_onnx(model, example, path: str | Path, opset: int = 17) -> Path:
    """Plain FP32 ONNX of a float ``nn.Module`` (TorchScript exporter, dynamic batch axis, constant folding).

    This is the file every tool starts from: ONNX Runtime's calibrators and ``quantize_static`` read it, and the
    FP32 reference outputs come from running it on ONNX Runtime.
    """
    import io
    import warnings

    import onnx
    import torch

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (example,), buf, dynamo=False, opset_version=opset, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return path
