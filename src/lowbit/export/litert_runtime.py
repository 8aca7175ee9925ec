"""Running ``.tflite`` files on the LiteRT interpreter: predictions, latency, the int8 interface.

The interpreter applies the XNNPACK delegate by default (what an Android / iOS app gets); ``xnnpack=False``
selects TFLite's built-in reference kernels instead. Models are converted for batch 1, so a batch is run row by
row.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch


def make_interpreter(model: str | Path | bytes, threads: int = 2, xnnpack: bool = True):
    """An allocated LiteRT interpreter for a ``.tflite`` path or bytes."""
    from ai_edge_litert import interpreter as lite

    kwargs = {"num_threads": threads}
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(model, (bytes, bytearray)):
        interp = lite.Interpreter(model_content=bytes(model), **kwargs)
    else:
        interp = lite.Interpreter(model_path=str(model), **kwargs)
    interp.allocate_tensors()
    return interp


def _qparams(detail: dict) -> tuple[float, int]:
    scale, zp = detail["quantization"]
    return float(scale), int(zp)


def to_model_input(interp, x: np.ndarray) -> np.ndarray:
    """``x`` (float) in the dtype the interpreter's input takes: quantized with its qparams for an int8 input
    (round half to even, as lowbit's quantizers)."""
    detail = interp.get_input_details()[0]
    if detail["dtype"] == np.float32:
        return x.astype(np.float32)
    scale, zp = _qparams(detail)
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(detail["dtype"])


def from_model_output(interp, y: np.ndarray) -> np.ndarray:
    """The interpreter's output as float (dequantized for an int8 output)."""
    detail = interp.get_output_details()[0]
    if detail["dtype"] == np.float32:
        return y
    scale, zp = _qparams(detail)
    return (y.astype(np.float32) - zp) * np.float32(scale)


def output_step(model: str | Path | bytes) -> float | None:
    """The scale of the model's int8 output codes (one output quantization step), or None for a float output.

    With the float interface the int8 output is the tensor the final DEQUANTIZE reads (named without
    ``_float``)."""
    interp = make_interpreter(model, 1)
    out = interp.get_output_details()[0]
    if out["dtype"] == np.int8:
        return _qparams(out)[0]
    name = out["name"].removesuffix("_float")
    for d in interp.get_tensor_details():
        if d["name"] == name and d["dtype"] == np.int8:
            return _qparams(d)[0]
    return None


def run_rows(interp, x: torch.Tensor) -> torch.Tensor:
    """Float outputs for every row of ``x`` (one ``invoke`` per row)."""
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for row in x.detach().numpy():
        interp.set_tensor(inp["index"], to_model_input(interp, row[None]))
        interp.invoke()
        rows.append(from_model_output(interp, interp.get_tensor(out["index"]).copy()))
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


def predictor(model: str | Path | bytes, threads: int = 2, xnnpack: bool = True):
    """A ``predict(x) -> outputs`` running the ``.tflite`` model on the interpreter."""
    interp = make_interpreter(model, threads, xnnpack)
    return lambda x: run_rows(interp, x)


def latencies_ms(models: dict[str, str | Path | bytes], x: torch.Tensor, threads: int = 2, repeats: int = 30,
                 warmup: int = 5) -> dict[str, float]:
    """Median ``invoke`` wall time (ms) of each model on one row of ``x``, measured interleaved (one call of each
    model per round), so a load change on the machine hits all of them alike."""
    interps = {name: make_interpreter(m, threads) for name, m in models.items()}
    feeds = {}
    for name, interp in interps.items():
        feeds[name] = to_model_input(interp, x[:1].detach().numpy())
        interp.set_tensor(interp.get_input_details()[0]["index"], feeds[name])
        for _ in range(warmup):
            interp.invoke()
    times: dict[str, list[float]] = {name: [] for name in interps}
    for _ in range(repeats):
        for name, interp in interps.items():
            interp.set_tensor(interp.get_input_details()[0]["index"], feeds[name])
            t0 = time.perf_counter()
            interp.invoke()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}
