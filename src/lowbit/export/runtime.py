"""Running exported models on ONNX Runtime: sessions, which kernels really run, latency, parity.

Parity: the INT8 model run by ONNX Runtime and our PyTorch simulation of the same quantized model must
agree within one quantization step of the output on at least 99.9% of elements. The output step is the
output quantizer's scale when the output is quantized, else ``(max(y) - min(y)) / 255`` of the simulated
output (the step an 8-bit code of that output would have).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

log = logging.getLogger(__name__)

INT8_KERNELS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool",
                "QLinearAveragePool", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu")
PARITY_FRACTION = 0.999


def make_session(path: str | Path, threads: int = 2, optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """CPU session with full graph optimisation and a fixed intra-op thread count."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


NUMPY_OF_ONNX = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                 "tensor(double)": np.float64, "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


def input_feed(session: ort.InferenceSession, x: torch.Tensor) -> dict:
    """``{input name: x}`` in the dtype the session declares (float32 images, int64 token ids)."""
    meta = session.get_inputs()[0]
    return {meta.name: x.detach().cpu().numpy().astype(NUMPY_OF_ONNX.get(meta.type, np.float32))}


def run_session(session: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """One forward pass; returns the first output as a Tensor."""
    return torch.from_numpy(np.asarray(session.run(None, input_feed(session, x))[0]))


def batched_predict(session: ort.InferenceSession, batch_size: int = 32):
    """A ``predict(x)`` that runs an ONNX Runtime session in batches."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([run_session(session, chunk) for chunk in torch.split(x, batch_size)])

    return predict


def with_extra_outputs(model: onnx.ModelProto, extra: dict[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``extra`` (name → ONNX element type)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    for name, elem in extra.items():
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return copy


def optimized_graph(path: str | Path, threads: int = 2) -> onnx.ModelProto:
    """The graph ONNX Runtime actually executes after its optimisations (CPU provider, full optimisation)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(path, threads, optimized_path=out)
        return onnx.load(str(out))


def optimized_op_types(path: str | Path, threads: int = 2) -> Counter:
    """Op types of the graph ONNX Runtime actually executes after its optimisations."""
    return Counter(node.op_type for node in optimized_graph(path, threads).graph.node)


def int8_kernel_count(ops: Counter) -> int:
    """How many nodes of ``ops`` are integer kernels."""
    return sum(n for op, n in ops.items() if op in INT8_KERNELS)


def latency_ms(path: str | Path, x: torch.Tensor, threads: int = 2, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``session.run`` on ``x``, in milliseconds."""
    session = make_session(path, threads)
    feed = input_feed(session, x)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class ParityResult:
    """Agreement between ONNX Runtime and the PyTorch simulation."""

    ok: bool
    fraction_within_step: float
    max_abs_diff: float
    step: float
    elements: int
    segment: dict | None = None  # tensor-by-tensor result (``export.segment_parity``) when it was needed

    def to_dict(self) -> dict:
        return asdict(self)


def parity(sim_out: torch.Tensor, ort_out: torch.Tensor, step: float | None = None) -> ParityResult:
    """Compare simulated and engine outputs within one output quantization step."""
    sim, eng = sim_out.detach().double(), ort_out.detach().double()
    if sim.shape != eng.shape:
        raise ValueError(f"parity: output shapes differ (simulation {tuple(sim.shape)}, engine {tuple(eng.shape)})")
    if step is None:
        step = float((sim.max() - sim.min()).item()) / 255.0 or 1e-12
    diff = (sim - eng).abs()
    frac = float((diff <= step * (1 + 1e-6)).double().mean().item())
    return ParityResult(frac >= PARITY_FRACTION, frac, float(diff.max().item()), step, sim.numel())
