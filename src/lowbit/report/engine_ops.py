"""What ONNX Runtime really executes for an INT8 file: integer kernels, Q/DQ conversions, float ops.

Read from the graph ONNX Runtime writes after its own optimisations (``export.runtime.optimized_graph``),
not from the file: a ``Conv`` framed by Q/DQ nodes in the file runs as ``QLinearConv`` only when ONNX Runtime's
QDQ selectors accept the group. Every heavy op left in float there (Conv, ConvTranspose, MatMul, Gemm, LSTM,
GRU, RNN, their ``Fused*`` forms, ...) becomes a float layer with the reason, found by looking at the same node
in the written file:

* no ``DequantizeLinear`` in front of its activation input → ``input not quantized``;
* none in front of its weight (MatMul: its second input) → ``weight not quantized``;
* a Conv whose output reaches no ``QuantizeLinear`` (QLinearConv has an integer output);
* LSTM / GRU / RNN: ONNX Runtime has no static integer kernel (dynamic quantization has one);
* otherwise: no integer kernel for that Q/DQ group on the CPU provider.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from lowbit.export.runtime import INT8_KERNELS, optimized_graph
from lowbit.transforms.recipe import cpu_has_int8_dot_product

HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "FusedConv", "FusedGemm",
             "FusedMatMul", "NhwcFusedConv", "FusedConvTranspose", "Einsum", "Attention", "MultiHeadAttention")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
BASE_OP = {"FusedConv": "Conv", "NhwcFusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul",
           "FusedConvTranspose": "ConvTranspose"}
PASS_THROUGH = ("Relu", "Clip")  # a Q after Conv → Relu / Clip still makes a QLinearConv group


class _FileGraph:
    """Producers and consumers of the written file's tensors, and its nodes by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.by_name = {n.name: n for n in model.graph.node if n.name}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def node(self, executed: onnx.NodeProto) -> onnx.NodeProto | None:
        """The file's node an executed node came from: same name (``fused `` prefix dropped), else the producer
        of its NCHWc name (``<original output>_nchwc``) or of one of its outputs, looking through a Relu / Clip
        ONNX Runtime fused into it."""
        for name in (executed.name, executed.name.removeprefix("fused ")):
            if name in self.by_name:
                return self.by_name[name]
        for tensor in (executed.name.removesuffix("_nchwc"), *executed.output):
            node = self.producer.get(tensor)
            while node is not None and node.op_type in PASS_THROUGH:
                node = self.producer.get(node.input[0])
            if node is not None and node.op_type in HEAVY_OPS:
                return node
        return None

    def dequantized(self, tensor: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def quantized_output(self, tensor: str) -> bool:
        for user in self.users.get(tensor, []):
            if user.op_type == "QuantizeLinear":
                return True
            if user.op_type in PASS_THROUGH and self.quantized_output(user.output[0]):
                return True
        return False


def float_reason(op_type: str, node: onnx.NodeProto | None, graph: _FileGraph) -> str:
    """Why ONNX Runtime runs this heavy node (``op_type`` as executed) in float."""
    base = BASE_OP.get(op_type, op_type)
    if base in RECURRENT_OPS:
        return f"no static integer kernel for {base} in ONNX Runtime (dynamic quantization has one: --mode dynamic)"
    if node is None:
        return f"no integer kernel for this {base} on ONNX Runtime's CPU provider (node made by its optimizer)"
    inputs = list(node.input)
    if not graph.dequantized(inputs[0]):
        between = graph.producer.get(inputs[0])
        if between is not None and between.input and graph.dequantized(between.input[0]):
            return (f"input not quantized: a {between.op_type} sits between its DequantizeLinear and the {base} "
                    f"(ONNX Runtime's QDQ selectors need the DequantizeLinear right in front)")
        return f"input not quantized (no DequantizeLinear in front of '{inputs[0]}')"
    if len(inputs) > 1 and inputs[1] and not graph.dequantized(inputs[1]):
        what = "weight" if base in ("Conv", "ConvTranspose", "Gemm") else "second input"
        return f"{what} not quantized (no DequantizeLinear in front of '{inputs[1]}')"
    if base == "Conv" and not graph.quantized_output(node.output[0]):
        return "output not quantized (QLinearConv needs a QuantizeLinear after the Conv)"
    return f"no integer kernel for this Q/DQ {base} group on ONNX Runtime's CPU provider"


def engine_accounting(int8_path: str | Path, threads: int = 2, extra_kernels: tuple[str, ...] = ()) -> dict:
    """Integer kernels, Q/DQ conversions and float ops of the graph ONNX Runtime executes for ``int8_path``.

    ``extra_kernels``: more op types to list as low-bit kernels (``MatMulNBits`` for dynamic exports).

    Returns:
        ``int8_kernels`` (count of integer kernel nodes), ``executed_op_types`` (op → count, all nodes),
        ``integer_kernel_ops`` / ``qdq_conversion_ops`` / ``float_ops`` (op → count, a partition of the
        executed nodes; ``float_ops`` holds float compute and data movement), ``float_heavy_ops`` (one
        ``{"layer", "op", "reason"}`` per heavy op executed in float; ``layer`` is the node's name in the
        written file when found, else ONNX Runtime's).
    """
    optimized = optimized_graph(int8_path, threads)
    graph = _FileGraph(onnx.load(str(int8_path), load_external_data=False))
    ops = Counter(n.op_type for n in optimized.graph.node)
    kernels = (*INT8_KERNELS, *extra_kernels)
    heavy = []
    for n in optimized.graph.node:
        if n.op_type in HEAVY_OPS:
            source = graph.node(n)
            heavy.append({"layer": (source.name if source is not None else "") or n.name or n.op_type,
                          "op": n.op_type, "reason": float_reason(n.op_type, source, graph)})
    return {
        "int8_kernels": sum(c for op, c in ops.items() if op in INT8_KERNELS),
        "executed_op_types": dict(sorted(ops.items())),
        "integer_kernel_ops": {op: c for op, c in sorted(ops.items()) if op in kernels},
        "qdq_conversion_ops": {op: c for op, c in sorted(ops.items()) if op in QDQ_OPS},
        "float_ops": {op: c for op, c in sorted(ops.items()) if op not in kernels and op not in QDQ_OPS},
        "float_heavy_ops": heavy,
    }


def module_of(node_name: str) -> str | None:
    """The PyTorch module an exported node came from: ``/layer1/layer1.0/conv1/Conv`` → ``layer1.0.conv1``."""
    parts = [p for p in node_name.split("/")[1:-1] if p]
    if not parts:
        return None
    dotted = [i for i, p in enumerate(parts) if "." in p]
    start = dotted[-1] if dotted else 0
    return ".".join(parts[start:])


def merge_float_layers(declared: list[dict], engine: list[dict]) -> list[dict]:
    """``declared`` (from prepare_ / the recipe) plus every engine float heavy op not already named there.

    An engine entry whose node comes from a declared layer is not repeated; the declared entry gains
    ``node`` (the ONNX node name) and ``op``.
    """
    merged = [dict(d) for d in declared]
    by_layer = {d["layer"]: d for d in merged}
    for entry in engine:
        owner = by_layer.get(module_of(entry["layer"]) or "")
        if owner is not None:
            owner.setdefault("node", entry["layer"])
            owner.setdefault("op", entry["op"])
        elif entry["layer"] not in by_layer:
            merged.append(dict(entry))
            by_layer[entry["layer"]] = merged[-1]
    return merged


def slowdown(report: dict) -> str | None:
    """One sentence when INT8 is slower than FP32 at batch 1 or 32 (and why), else None."""
    slower = [f"batch {b}: {report[f'latency_ms_int8_b{b}']:.2f} ms vs {report[f'latency_ms_fp32_b{b}']:.2f} ms"
              for b in (1, 32) if report.get(f"latency_ms_int8_b{b}", 0) > report.get(f"latency_ms_fp32_b{b}", 0)]
    if not slower:
        return None
    n_float = len(report.get("float_heavy_ops", []))
    n_qdq = sum(report.get("qdq_conversion_ops", {}).values())
    return (f"INT8 is slower than FP32 on ONNX Runtime ({'; '.join(slower)}): {n_float} heavy op(s) run in float "
            f"and {n_qdq} QuantizeLinear / DequantizeLinear conversion(s) run between integer and float ops"
            + ("" if cpu_has_int8_dot_product() else "; this CPU has no VNNI int8 dot product, so integer "
               "kernels gain less over float ones"))
