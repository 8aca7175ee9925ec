"""Layer-wise error analysis of the exported INT8 model as ONNX Runtime runs it.

For every activation the INT8 graph quantizes (the non-constant input ``x`` of each ``QuantizeLinear``),
the engine's value of that tensor is the dequantized code ``(q - zp) · s``, the value the next layer
really consumes. It is compared with the FP32 export's value of the same tensor name (both files come
from the same prepared model, so activation names match). The codes ``q`` are read as extra graph
outputs on the ``QuantizeLinear`` outputs and dequantized here in numpy: exposing the codes keeps ONNX
Runtime's fused integer kernels (QLinearConv, ...), while exposing the ``DequantizeLinear`` outputs would
force extra float dequantization nodes into the optimized graph.

Only running sums survive a batch: ``Σ ref²``, ``Σ (ref - out)²``, ``Σ ref · out``, ``Σ out²``, the
element count and the number of codes at the code type's min / max. Formulas as in
:mod:`lowbit.analysis.metrics`.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from lowbit.analysis.layerwise import ErrorStats
from lowbit.export.runtime import make_session, with_extra_outputs

log = logging.getLogger(__name__)

OUTPUT_CONSUMER = "graph output"


@dataclass
class QuantizedTensor:
    """One activation quantized by a ``QuantizeLinear`` node of the INT8 graph.

    Attributes:
        tensor: name of the float tensor fed to the QuantizeLinear (same name in the FP32 graph).
        codes: name of the QuantizeLinear output (the integer codes).
        scale: the scale (scalar or per-channel 1-D array).
        zero_point: the zero point, with the code dtype (uint8 / int8).
        axis: the quantization axis for per-channel parameters.
        consumer: ``"OpType node_name"`` of every node consuming the dequantized value, joined by ``", "``.
    """

    tensor: str
    codes: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    consumer: str

    def _params(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point as float64, per-channel ones shaped to broadcast along ``axis``."""
        scale, zp = self.scale.astype(np.float64), self.zero_point.astype(np.float64)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * ndim
            shape[self.axis % ndim] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return scale, zp

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """``(q - zp) · s`` in float64."""
        scale, zp = self._params(q.ndim)
        return (q.astype(np.float64) - zp) * scale

    def saturated(self, q: np.ndarray) -> int:
        """How many codes sit at the code type's min or max without being the zero point (clipped values).

        A code equal to the zero point stands for an exact 0.0 (ReLU outputs under an unsigned
        zero-point-0 quantizer), not for a clipped value, so it is not counted.
        """
        info = np.iinfo(q.dtype)
        _, zp = self._params(q.ndim)
        return int(np.count_nonzero(((q == info.min) | (q == info.max)) & (q != zp)))


@dataclass
class RunningError(ErrorStats):
    """:class:`ErrorStats` over numpy batches, plus clipped codes and a NaN/Inf flag.

    Metrics that are undefined (nothing seen, NaN / Inf values) are ``nan`` here rather than None, so the
    rows of one engine run stay numeric.
    """

    saturated: int = 0
    nonfinite: bool = False

    @property
    def count(self) -> int:
        """Elements seen."""
        return self.n

    def update(self, ref: np.ndarray, out: np.ndarray, saturated: int = 0) -> None:
        """Add one batch: ``ref`` (FP32) and ``out`` (engine) of equal size; ``saturated`` clipped codes in it."""
        ref, out = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(out, dtype=np.float64).ravel()
        if ref.shape != out.shape:
            raise ValueError(f"FP32 and INT8 values differ in size ({ref.size} vs {out.size})")
        self.nonfinite |= not (bool(np.isfinite(ref).all()) and bool(np.isfinite(out).all()))
        super().update(torch.from_numpy(ref), torch.from_numpy(out))
        self.saturated += saturated

    def sqnr_db(self) -> float:
        value = super().sqnr_db()
        return math.nan if value is None else value

    def cosine(self) -> float:
        value = super().cosine()
        return math.nan if value is None else value

    def mse(self) -> float:
        value = super().mse()
        return math.nan if value is None else value


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Values of every initializer and ``Constant`` node output of the graph."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _consumers(model: onnx.ModelProto, q_output: str) -> str:
    """``"OpType name"`` of the nodes fed by the DequantizeLinear(s) that read ``q_output``."""
    dq_outs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_output}
    users = [f"{n.op_type} {n.name}" for n in model.graph.node if dq_outs & set(n.input)]
    users += [OUTPUT_CONSUMER for o in model.graph.output if o.name in dq_outs]
    return ", ".join(users)


MOVES_DATA = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _requantizes(q: onnx.NodeProto, producers: dict) -> bool:
    """True for a QuantizeLinear that re-applies the qparams of the DequantizeLinear its input came from
    through data-movement ops only (``nn.Requantize``): it names no new tensor."""
    node = producers.get(q.input[0])
    while node is not None and node.op_type in MOVES_DATA:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear" and list(node.input[1:]) == list(q.input[1:])


def quantized_tensors(model: onnx.ModelProto) -> list[QuantizedTensor]:
    """The activations ``model`` quantizes, in graph (topological) order; constant inputs are skipped."""
    consts = _constants(model)
    found = []
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in consts or _requantizes(node, producers):
            continue
        scale = consts[node.input[1]]
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = consts[zp_name] if zp_name else np.zeros_like(scale, dtype=np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        found.append(QuantizedTensor(node.input[0], node.output[0], scale, zp, axis,
                                     _consumers(model, node.output[0])))
    return found


def _with_outputs(model: onnx.ModelProto, names: dict[str, int], path: Path) -> Path:
    """Save a copy of ``model`` that also outputs ``names`` (name → ONNX elem type); returns ``path``."""
    onnx.save(with_extra_outputs(model, names), str(path))
    return path


class _Runner:
    """One ONNX Runtime session that returns the requested tensors (graph inputs served from the feed)."""

    def __init__(self, model: onnx.ModelProto, names: dict[str, int], path: Path, threads: int) -> None:
        self.session = make_session(_with_outputs(model, names, path), threads)
        self.input = self.session.get_inputs()[0].name
        self.fetch = [n for n in dict.fromkeys(names) if n != self.input]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Forward ``x``; ``{name: value}`` for every requested tensor."""
        values = dict(zip(self.fetch, self.session.run(self.fetch, {self.input: x})))
        values[self.input] = x
        return values


def _code_elem(qt: QuantizedTensor) -> int:
    return helper.np_dtype_to_tensor_dtype(qt.zero_point.dtype)


def _setup(fp32_path: Path, int8_path: Path, tmp: Path, threads: int):
    """Both runners, the quantized tensors, and the graph outputs compared at the end."""
    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    tensors = quantized_tensors(int8)
    fp_names = {o.name for o in fp32.graph.output} | {i.name for i in fp32.graph.input}
    fp_names |= {o for n in fp32.graph.node for o in n.output}
    missing = [qt.tensor for qt in tensors if qt.tensor not in fp_names]
    if missing:
        raise ValueError(f"{fp32_path}: tensors quantized in {int8_path} are absent from the FP32 graph: {missing}")
    outputs = [o.name for o in int8.graph.output if o.name in {p.name for p in fp32.graph.output}]
    fp_want = {qt.tensor: onnx.TensorProto.FLOAT for qt in tensors} | dict.fromkeys(outputs, onnx.TensorProto.FLOAT)
    int_want = {qt.codes: _code_elem(qt) for qt in tensors} | dict.fromkeys(outputs, onnx.TensorProto.FLOAT)
    return (_Runner(fp32, fp_want, tmp / "fp32.onnx", threads), _Runner(int8, int_want, tmp / "int8.onnx", threads),
            tensors, outputs)


def _row(tensor: str, consumer: str, err: RunningError, saturation: float | None) -> dict:
    return {"tensor": tensor, "consumer": consumer, "sqnr_db": err.sqnr_db(), "cosine": err.cosine(),
            "mse": err.mse(), "saturation_rate": saturation, "nonfinite": err.nonfinite, "elements": err.count}


def analyze_onnx(fp32_path: str | Path, int8_path: str | Path, inputs: torch.Tensor, batch_size: int = 16,
                 threads: int = 2) -> list[dict]:
    """Compare every quantized activation of the INT8 ONNX model, as ONNX Runtime runs it, with the FP32 export.

    Args:
        fp32_path: the FP32 export (``export_onnx(..., float_model=True)``).
        int8_path: the Q/DQ export of the same prepared model.
        inputs: evaluation inputs ``[N, ...]``, streamed in batches.
        batch_size: samples per ``session.run``.
        threads: ONNX Runtime intra-op threads.

    Returns:
        one row per ``QuantizeLinear`` on an activation, in graph order, then one per graph output
        (``consumer == "graph output"``, ``saturation_rate`` None). Keys: ``tensor``, ``consumer``,
        ``sqnr_db``, ``cosine``, ``mse``, ``saturation_rate`` (share of codes clipped to the code type's min / max, see
        :meth:`QuantizedTensor.saturated`),
        ``nonfinite`` (an FP32 or INT8 value was NaN / Inf) and ``elements``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be >= 1")
    x_all = inputs.detach().cpu().numpy().astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-analysis-") as tmp:
        fp_run, int_run, tensors, outputs = _setup(Path(fp32_path), Path(int8_path), Path(tmp), threads)
        errors = [RunningError() for _ in tensors]
        out_errors = [RunningError() for _ in outputs]
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start:start + batch_size]
            ref, eng = fp_run.run(x), int_run.run(x)
            for qt, err in zip(tensors, errors):
                err.update(ref[qt.tensor], qt.dequantize(eng[qt.codes]), qt.saturated(eng[qt.codes]))
            for name, err in zip(outputs, out_errors):
                err.update(ref[name], eng[name])
            del ref, eng
    rows = [_row(qt.tensor, qt.consumer, e, e.saturated / e.count if e.count else math.nan)
            for qt, e in zip(tensors, errors)]
    rows += [_row(name, OUTPUT_CONSUMER, e, None) for name, e in zip(outputs, out_errors)]
    log.info("analysed %d quantized tensors of %s on %d samples", len(tensors), int8_path, x_all.shape[0])
    return rows


def first_nonfinite(rows: list[dict]) -> str | None:
    """The first tensor (graph order) whose FP32 or INT8 value had a NaN / Inf, else None."""
    return next((r["tensor"] for r in rows if r.get("nonfinite")), None)


def worst_tensors(rows: list[dict], n: int = 5) -> list[dict]:
    """The ``n`` rows with the lowest SQNR (NaN counted as worst)."""
    def key(r: dict) -> float:
        v = r["sqnr_db"]
        return -math.inf if v is None or math.isnan(v) else v
    return sorted(rows, key=key)[:n]


def to_json(rows: list[dict]) -> list[dict]:
    """``rows`` with non-finite floats as the strings ``"inf"`` / ``"-inf"`` / ``"nan"``."""
    def fix(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return v
    return [{k: fix(v) for k, v in r.items()} for r in rows]
