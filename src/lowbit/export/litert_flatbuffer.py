"""Reading and editing ``.tflite`` flatbuffers (LiteRT's schema, shipped with ``ai_edge_litert``).

* :func:`op_summary`: the op types of the main subgraph and which ones compute in int8, read from the file itself.
* :func:`float_interface`: the converter strips the model's first quantize and last dequantize (int8 input and
  output); this puts them back as QUANTIZE / DEQUANTIZE ops so the model takes and returns float32, as an app
  that feeds camera frames expects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Ops that only convert between float and integer (or move data): not counted as int8 compute.
CONVERSION_OPS = ("QUANTIZE", "DEQUANTIZE")
DATA_OPS = ("RESHAPE", "TRANSPOSE", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "CONCATENATION", "GATHER",
            "STRIDED_SLICE", "SLICE", "SPLIT", "PACK", "UNPACK")
def _schema():
    from ai_edge_litert import schema_py_generated as schema  # optional dependency (lowbit[litert])

    return schema


def _op_names() -> dict[int, str]:
    schema = _schema()
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _type_names() -> dict[int, str]:
    schema = _schema()
    return {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def load_model(buf: bytes):
    """The flatbuffer as the schema's object tree (``ModelT``)."""
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAs(buf, 0))


def _opcode_name(code, names: dict[int, str]) -> str:
    builtin = max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))
    if builtin == _schema().BuiltinOperator.CUSTOM:
        return f"CUSTOM:{(code.customCode or b'').decode(errors='replace')}"
    return names.get(builtin, str(builtin))


@dataclass
class OpSummary:
    """Op types of a ``.tflite`` main subgraph, split into int8 compute, float compute and conversions."""

    ops: Counter = field(default_factory=Counter)
    int8_ops: Counter = field(default_factory=Counter)
    float_ops: Counter = field(default_factory=Counter)
    float_compute: list[dict] = field(default_factory=list)  # {"op", "output"} of float compute ops
    input_types: list[str] = field(default_factory=list)
    output_types: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    weight_dequantize: int = 0  # DEQUANTIZE ops of constants (int8 weights of a float layer), run once

    def coverage(self) -> float:
        """Share of compute ops (everything but conversions and data movement) that run in int8."""
        compute = sum(n for op, n in self.ops.items() if op not in CONVERSION_OPS + DATA_OPS)
        int8 = sum(n for op, n in self.int8_ops.items() if op not in DATA_OPS)
        return int8 / compute if compute else 0.0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"op_types": dict(self.ops), "int8_ops": dict(self.int8_ops), "float_ops": dict(self.float_ops),
                "int8_coverage": self.coverage(), "float_compute_ops": self.float_compute,
                "input_types": self.input_types, "output_types": self.output_types,
                "output_names": self.output_names, "weight_dequantize": self.weight_dequantize}


def op_summary(buf: bytes) -> OpSummary:
    """Op types of the main subgraph; an op is int8 when its first input and its output are int8 tensors."""
    model = load_model(buf)
    names, types = _op_names(), _type_names()
    sg = model.subgraphs[0]
    summary = OpSummary()
    for op in sg.operators or []:
        name = _opcode_name(model.operatorCodes[op.opcodeIndex], names)
        summary.ops[name] += 1
        ins = [types.get(sg.tensors[i].type) for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        outs = [types.get(sg.tensors[i].type) for i in (op.outputs if op.outputs is not None else [])]
        if name in CONVERSION_OPS:
            summary.weight_dequantize += int(name == "DEQUANTIZE" and _is_constant(model, sg, op.inputs[0]))
            continue
        if ins and ins[0] == "INT8" and outs and outs[0] == "INT8":
            summary.int8_ops[name] += 1
        else:
            summary.float_ops[name] += 1
            if name not in DATA_OPS:
                out = sg.tensors[op.outputs[0]].name if op.outputs is not None and len(op.outputs) else b""
                summary.float_compute.append({"op": name, "output": _text(out)})
    summary.input_types = [types.get(sg.tensors[i].type) for i in sg.inputs]
    summary.output_types = [types.get(sg.tensors[i].type) for i in sg.outputs]
    summary.output_names = [_text(sg.tensors[i].name) for i in sg.outputs]
    return summary


def _is_constant(model, sg, index: int) -> bool:
    """The tensor has data in the file (a weight or other constant)."""
    data = model.buffers[sg.tensors[index].buffer].data
    return data is not None and len(data) > 0


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def _opcode_index(model, builtin: int) -> int:
    schema = _schema()
    for i, code in enumerate(model.operatorCodes):
        if max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0)) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _float_twin(sg, index: int, suffix: str) -> int:
    schema = _schema()
    src = sg.tensors[index]
    t = schema.TensorT()
    t.shape, t.shapeSignature = src.shape, src.shapeSignature
    t.type, t.buffer, t.name = schema.TensorType.FLOAT32, 0, _text(src.name) + suffix
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _op(opcode: int, inputs: list[int], outputs: list[int]):
    op = _schema().OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode, inputs, outputs
    return op


def float_interface(buf: bytes) -> bytes:
    """``buf`` with float32 inputs / outputs: a QUANTIZE before every int8 input, a DEQUANTIZE after every int8
    output (same qparams), signature entries pointing at the new tensors. Float tensors are left as they are."""
    schema = _schema()
    model = load_model(buf)
    sg = model.subgraphs[0]
    int8 = schema.TensorType.INT8
    renamed: dict[int, int] = {}
    head, tail = [], []
    sg.inputs, sg.outputs = [int(i) for i in sg.inputs], [int(i) for i in sg.outputs]
    for k, idx in enumerate(list(sg.inputs)):
        if sg.tensors[idx].type == int8:
            new = _float_twin(sg, idx, "_float")
            head.append(_op(_opcode_index(model, schema.BuiltinOperator.QUANTIZE), [new], [idx]))
            sg.inputs[k], renamed[idx] = new, new
    for k, idx in enumerate(list(sg.outputs)):
        if sg.tensors[idx].type == int8:
            new = _float_twin(sg, idx, "_float")
            tail.append(_op(_opcode_index(model, schema.BuiltinOperator.DEQUANTIZE), [idx], [new]))
            sg.outputs[k], renamed[idx] = new, new
    sg.operators = head + list(sg.operators or []) + tail
    for sig in model.signatureDefs or []:
        for entry in list(sig.inputs or []) + list(sig.outputs or []):
            entry.tensorIndex = renamed.get(entry.tensorIndex, entry.tensorIndex)
    return pack(model, len(buf))


def pack(model, size_hint: int = 1 << 20) -> bytes:
    """The ``.tflite`` bytes of a schema object tree (``ModelT``), file identifier ``TFL3``."""
    import flatbuffers

    builder = flatbuffers.Builder(size_hint + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
