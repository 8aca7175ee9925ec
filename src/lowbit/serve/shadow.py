"""Shadow comparison of the INT8 and FP32 models on sampled requests: output divergence and per-layer error.

Output divergence of the INT8 output ``q`` from the FP32 output ``p`` (first graph output, rows along dim 0):

* ``kl``: mean over rows of ``Σ softmax(p) · (log softmax(p) - log softmax(q))`` along the last dim, nats
* ``sqnr_db``: ``10 · log10(Σ p² / Σ (p - q)²)`` over the whole output
* ``top1_mismatch``: share of rows with ``argmax p ≠ argmax q``

Per-layer error, for every activation the INT8 graph quantizes (found as in
:mod:`lowbit.analysis.onnx_tensors`): the engine's value of that tensor is the dequantized code
``x̂ = (q - zp) · s``. The INT8 *debug* session exposes the ``QuantizeLinear`` codes ``q`` as extra outputs
(this keeps ONNX Runtime's fused integer kernels, so its first output is bit-identical to the plain
session's). The *reference* session is the FP32 graph with the codes as extra inputs and, per activation
``x``, ``DequantizeLinear → Sub → ReduceSumSquare`` nodes: ONNX Runtime computes ``Σ (x - x̂)²`` and ``Σ x²``
over the whole tensor in its own kernels (float32 accumulation) and hands back two scalars per layer instead of
every activation. Exported per layer:

* relative error ``e = sqrt(Σ (x - x̂)² / Σ x²)`` (0 = exact; ``lowbit_quantization_error``)
* ``sqnr_db = 10 · log10(Σ x² / Σ (x - x̂)²) = -20 · log10(e)``
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.analysis.onnx_tensors import QuantizedTensor, quantized_tensors
from lowbit.export.runtime import make_session, with_extra_outputs
from lowbit.serve.config import Threshold

PROBE_PREFIX = "lowbit_probe"


def relative_error(noise: float, signal: float) -> tuple[float, float]:
    """``(sqrt(noise / signal), 10 · log10(signal / noise))`` with the exact and all-zero cases spelled out."""
    if noise == 0.0:
        return 0.0, math.inf
    if signal == 0.0 or not (math.isfinite(noise) and math.isfinite(signal)):
        return math.inf, -math.inf
    return math.sqrt(noise / signal), 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class Divergence:
    """How far one INT8 output is from the FP32 output of the same input."""

    kl: float
    sqnr_db: float
    top1_mismatch: float
    rows: int

    def is_bad(self, threshold: Threshold) -> bool:
        """True when any limit of ``threshold`` is broken (a NaN anywhere counts as broken)."""
        if any(math.isnan(v) for v in (self.kl, self.sqnr_db, self.top1_mismatch)):
            return True
        return (self.kl > threshold.kl_max or self.sqnr_db < threshold.sqnr_min_db
                or self.top1_mismatch > threshold.top1_mismatch_max)

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def output_divergence(ref: np.ndarray, out: np.ndarray) -> Divergence:
    """Divergence of ``out`` (INT8) from ``ref`` (FP32), both ``[N, ..., C]`` (a 1-D output is one row).

    Plain numpy in float64 (the same formulas as :mod:`lowbit.analysis.metrics`, without torch's per-call
    overhead, which dominated a shadow comparison of a small model).
    """
    if ref.shape != out.shape:
        raise ValueError(f"shadow: FP32 output shape {ref.shape} differs from INT8 output shape {out.shape}")
    p = np.atleast_2d(np.asarray(ref, dtype=np.float64))
    q = np.atleast_2d(np.asarray(out, dtype=np.float64))
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        return Divergence(math.nan, math.nan, math.nan, int(p.shape[0]))
    rows_p, rows_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    lp, lq = _log_softmax(rows_p), _log_softmax(rows_q)
    kl = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
    diff = (p - q).ravel()
    noise, signal = float(np.dot(diff, diff)), float(np.dot(p.ravel(), p.ravel()))
    sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10.0 * math.log10(signal / noise))
    mismatch = float(np.mean(rows_p.argmax(axis=-1) != rows_q.argmax(axis=-1)))
    return Divergence(kl, sqnr, mismatch, int(p.shape[0]))


def layer_label(tensor: str) -> str:
    """Metric label of a quantized activation: ``"/res_relu/Relu_output_0"`` → ``"res_relu/Relu"``."""
    label = tensor.lstrip("/")
    label = label[: -len("_output_0")] if label.endswith("_output_0") else label
    return label or tensor


def _session(model: onnx.ModelProto, threads: int):
    """An ONNX Runtime session (lowbit's settings) of an in-memory model."""
    fd, tmp = tempfile.mkstemp(prefix="lowbit-serve-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        return make_session(tmp, threads)  # the session keeps the graph in memory; the file can go
    finally:
        Path(tmp).unlink(missing_ok=True)


class DebugRunner:
    """One model run with its graph outputs plus named intermediate tensors.

    ``run(x)`` returns ``(outputs, extra)``: the model's own outputs (a list, graph order) and ``{name: value}``
    of the intermediate tensors (a graph input asked for is served from the feed).
    """

    def __init__(self, model: onnx.ModelProto, extra: dict[str, int], threads: int) -> None:
        self.session = _session(with_extra_outputs(model, extra), threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in model.graph.output]
        self.extra = [n for n in extra if n != self.input and n not in self.outputs]
        self._fetch = self.outputs + self.extra

    def run(self, x: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        values = self.session.run(self._fetch, {self.input: x})
        n = len(self.outputs)
        extra = dict(zip(self.extra, values[n:]))
        extra[self.input] = x
        return values[:n], extra


@dataclass(frozen=True)
class LayerProbe:
    """One quantized activation watched on shadowed requests."""

    label: str
    quantized: QuantizedTensor


def _reference_model(fp32: onnx.ModelProto, probes: list[LayerProbe]) -> onnx.ModelProto:
    """The FP32 graph plus, per probe ``i``: input ``lowbit_probe{i}_codes`` and outputs ``..._noise`` /
    ``..._signal`` = ``ReduceSumSquare(x - DequantizeLinear(codes))`` / ``ReduceSumSquare(x)``."""
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    g = model.graph
    for i, probe in enumerate(probes):
        qt, name = probe.quantized, f"{PROBE_PREFIX}{i}"
        g.input.append(helper.make_tensor_value_info(f"{name}_codes", helper.np_dtype_to_tensor_dtype(qt.zero_point.dtype),
                                                     None))
        g.initializer.extend([numpy_helper.from_array(np.asarray(qt.scale, np.float32), f"{name}_scale"),
                              numpy_helper.from_array(np.asarray(qt.zero_point), f"{name}_zp")])
        axis = {"axis": qt.axis} if np.asarray(qt.scale).size > 1 else {}
        g.node.extend([
            helper.make_node("DequantizeLinear", [f"{name}_codes", f"{name}_scale", f"{name}_zp"], [f"{name}_deq"], **axis),
            helper.make_node("Sub", [qt.tensor, f"{name}_deq"], [f"{name}_diff"]),
            helper.make_node("ReduceSumSquare", [f"{name}_diff"], [f"{name}_noise"], keepdims=0),
            helper.make_node("ReduceSumSquare", [qt.tensor], [f"{name}_signal"], keepdims=0),
        ])
        g.output.extend([helper.make_tensor_value_info(f"{name}_{k}", onnx.TensorProto.FLOAT, None)
                         for k in ("noise", "signal")])
    return model


class ReferenceRunner:
    """The FP32 model that also measures every probe's error against INT8 codes fed to it.

    ``run(x, codes)`` returns ``(fp32 first output, {label: (relative error, sqnr_db)})`` where ``codes`` maps each
    probe's ``QuantizeLinear`` output name to its value from the INT8 debug session on the same ``x``.
    """

    def __init__(self, fp32: onnx.ModelProto, probes: list[LayerProbe], threads: int) -> None:
        self.session = _session(_reference_model(fp32, probes), threads)
        self.input = fp32.graph.input[0].name
        self.probes = probes
        self._fetch = [fp32.graph.output[0].name]
        self._fetch += [f"{PROBE_PREFIX}{i}_{k}" for i in range(len(probes)) for k in ("noise", "signal")]

    def run(self, x: np.ndarray, codes: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
        feed = {self.input: x}
        feed.update({f"{PROBE_PREFIX}{i}_codes": codes[p.quantized.codes] for i, p in enumerate(self.probes)})
        values = self.session.run(self._fetch, feed)
        sums = values[1:]
        layers = {p.label: relative_error(float(sums[2 * i]), float(sums[2 * i + 1])) for i, p in enumerate(self.probes)}
        return values[0], layers


def build_probes(int8: onnx.ModelProto, fp32: onnx.ModelProto, threads: int
                 ) -> tuple[list[LayerProbe], DebugRunner, ReferenceRunner]:
    """Probes of every quantized activation, the INT8 debug runner exposing their codes, the FP32 reference runner.

    Raises:
        ValueError: a quantized tensor of the INT8 graph is absent from the FP32 graph (not one export pair).
    """
    tensors = quantized_tensors(int8)
    fp_names = {i.name for i in fp32.graph.input} | {o for n in fp32.graph.node for o in n.output}
    missing = [qt.tensor for qt in tensors if qt.tensor not in fp_names]
    if missing:
        raise ValueError(f"the FP32 model lacks tensors the INT8 model quantizes ({missing[:3]}): "
                         f"not an export pair of one prepared model")
    labels: dict[str, int] = {}
    probes = []
    for qt in tensors:
        label = layer_label(qt.tensor)
        labels[label] = labels.get(label, 0) + 1
        probes.append(LayerProbe(label if labels[label] == 1 else qt.tensor, qt))
    int8_run = DebugRunner(int8, {qt.codes: helper.np_dtype_to_tensor_dtype(qt.zero_point.dtype) for qt in tensors},
                           threads)
    return probes, int8_run, ReferenceRunner(fp32, probes, threads)
