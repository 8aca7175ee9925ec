"""Graph rewrites of converted ``.tflite`` flatbuffers (LiteRT schema object API, ``ModelT``).

* :func:`fold_same_pads`: a ``PAD`` (with ``TRANSPOSE`` pairs around it) in front of a VALID convolution whose
  padding is exactly what TensorFlow ``SAME`` adds becomes the convolution's own ``padding=SAME``.
* :func:`int8_weights_behind_dequantize`: float32 weight constants that are dequantized int8 codes are stored as
  those codes behind a DEQUANTIZE op (a float layer at the int8 size).
* :func:`drop_unused`: removes tensors no op reads or writes and buffers no tensor uses (indices renumbered).

Both edit the object tree in place; :func:`lowbit.export.litert_flatbuffer.pack` writes it back to bytes.
"""

from __future__ import annotations

import logging

import numpy as np

from lowbit.export.litert_flatbuffer import _op_names, _opcode_name, _schema, load_model, pack

log = logging.getLogger(__name__)

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
LAYOUT_OPS = ("TRANSPOSE", "PAD")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow / TFLite ``SAME`` padding of one spatial axis as ``(before, after)``.

    ``out = ceil(size / stride)``, ``k_eff = (kernel - 1) · dilation + 1``,
    ``total = max((out - 1) · stride + k_eff - size, 0)``, ``before = total // 2``, ``after = total - before``
    (for stride 2 on an even size that is the asymmetric ``(p, p + 1)`` a PyTorch conv cannot state).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _const(model, sg, index: int) -> np.ndarray | None:
    """An int32 constant tensor's values (None when the tensor has no data)."""
    data = model.buffers[sg.tensors[index].buffer].data
    if data is None or len(data) == 0:
        return None
    return np.frombuffer(bytes(bytearray(data)), dtype="<i4").reshape([int(d) for d in sg.tensors[index].shape])


def _qparams(tensor) -> tuple:
    """``(scales, zero_points)`` of a tensor, ``()`` for an unquantized one."""
    q = tensor.quantization
    if q is None or q.scale is None:
        return ()
    return tuple(np.asarray(q.scale, np.float32).tolist()), tuple(np.asarray(q.zeroPoint, np.int64).tolist())


class _Graph:
    """Producer / consumer index of the main subgraph."""

    def __init__(self, model):
        self.model, self.sg = model, model.subgraphs[0]
        names = _op_names()
        self.kind = [_opcode_name(model.operatorCodes[op.opcodeIndex], names) for op in self.sg.operators]
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        for k, op in enumerate(self.sg.operators):
            for t in op.outputs:
                self.producer[int(t)] = k
            for t in op.inputs:
                if t >= 0:
                    self.consumers.setdefault(int(t), []).append(k)
        self.graph_outputs = {int(t) for t in self.sg.outputs}

    def private(self, tensor: int) -> bool:
        """The tensor feeds exactly one op and is not a model output."""
        return len(self.consumers.get(tensor, [])) == 1 and tensor not in self.graph_outputs


def _pad_chain(g: _Graph, tensor: int):
    """Walk back from a conv input through single-use TRANSPOSE / PAD ops to the first tensor whose axes are the
    conv input's axes again.

    Returns ``(source, ops, pads)``: the tensor the conv can read instead, the ops in between, and the summed
    padding as ``[[before, after], ...]`` in the conv input's axes; None when no PAD lies on such a chain.
    """
    axes = list(range(len(g.sg.tensors[tensor].shape)))  # axes[i]: the conv-input axis of this tensor's axis i
    pads = np.zeros((len(axes), 2), np.int64)
    ops, best = [], None
    while tensor in g.producer and g.kind[g.producer[tensor]] in LAYOUT_OPS:
        k = g.producer[tensor]
        op = g.sg.operators[k]
        const = _const(g.model, g.sg, int(op.inputs[1])) if len(op.inputs) == 2 else None
        if const is None or not g.private(tensor):  # every tensor on the chain, the conv input too
            break
        if g.kind[k] == "PAD":
            for i, a in enumerate(axes):
                pads[a] += const[i]
        else:
            new_axes = [0] * len(axes)
            for i, p in enumerate(const.tolist()):
                new_axes[p] = axes[i]
            axes = new_axes
        ops.append(k)
        tensor = int(op.inputs[0])
        if axes == sorted(axes) and any(g.kind[j] == "PAD" for j in ops):
            best = (tensor, list(ops), pads.copy())
    return best


def _foldable(g: _Graph, k: int, chain) -> bool:
    """The chain's padding is the conv's SAME padding on H and W only, with unchanged qparams."""
    op, source, pads = g.sg.operators[k], chain[0], chain[2]
    opts = op.builtinOptions
    if opts.padding != _schema().Padding.VALID or pads[0].any() or pads[3].any() or pads.min() < 0:
        return False
    src, dst = g.sg.tensors[source], g.sg.tensors[int(op.inputs[0])]
    if _qparams(src) != _qparams(dst) or src.type != dst.type:
        return False
    kernel = g.sg.tensors[int(op.inputs[1])].shape
    want = [same_padding(int(src.shape[1]), int(kernel[1]), opts.strideH, opts.dilationHFactor),
            same_padding(int(src.shape[2]), int(kernel[2]), opts.strideW, opts.dilationWFactor)]
    return [tuple(pads[1]), tuple(pads[2])] == want


def fold_same_pads_model(model) -> int:
    """In place: every VALID CONV_2D / DEPTHWISE_CONV_2D fed by a SAME-sized zero padding (a PAD, possibly
    between TRANSPOSE ops that cancel) reads the unpadded tensor with ``padding=SAME``; the PAD / TRANSPOSE ops
    go. Returns the number of convs rewritten.

    Bit-exact: an int8 PAD without a constant pads with its output zero-point, and a SAME int8 conv pads with
    its input zero-point; the rewrite requires the two tensors to carry the same scale and zero-point (float
    models pad with 0.0 both ways).
    """
    g = _Graph(model)
    dead: set[int] = set()
    for k, op in enumerate(g.sg.operators):
        if g.kind[k] not in CONV_OPS:
            continue
        chain = _pad_chain(g, int(op.inputs[0]))
        if chain is None or dead.intersection(chain[1]) or not _foldable(g, k, chain):
            continue
        op.inputs = [chain[0]] + [int(t) for t in op.inputs[1:]]
        op.builtinOptions.padding = _schema().Padding.SAME
        dead.update(chain[1])
    g.sg.operators = [op for k, op in enumerate(g.sg.operators) if k not in dead]
    folded = len({k for k in dead if g.kind[k] == "PAD"})
    if dead:
        drop_unused(model)
    return folded


def fold_same_pads(buf: bytes) -> tuple[bytes, int]:
    """``buf`` with :func:`fold_same_pads_model` applied, and the number of convs rewritten (``buf`` unchanged
    when there is none)."""
    model = load_model(buf)
    folded = fold_same_pads_model(model)
    log.info("LiteRT rewrite: %d SAME paddings folded into their convolutions", folded)
    return (pack(model, len(buf)) if folded else buf), folded


def _used_tensors(sg) -> list[int]:
    """Sorted indices of the tensors an op, input or output of ``sg`` refers to."""
    used = {int(t) for op in sg.operators for t in list(op.inputs) + list(op.outputs) if t >= 0}
    used |= {int(t) for t in sg.inputs} | {int(t) for t in sg.outputs}
    used |= {int(t) for op in sg.operators for t in (op.intermediates if op.intermediates is not None else [])}
    return sorted(used)


def drop_unused(model) -> None:
    """Remove the main subgraph's tensors no op, input or output refers to, then every buffer no tensor or
    metadata entry refers to (buffer 0, the empty sentinel, stays); all indices are renumbered."""
    sg = model.subgraphs[0]
    keep = _used_tensors(sg)
    remap = {old: new for new, old in enumerate(keep)}
    sg.tensors = [sg.tensors[i] for i in keep]
    for op in sg.operators:
        op.inputs = [remap[int(t)] if t >= 0 else int(t) for t in op.inputs]
        op.outputs = [remap[int(t)] for t in op.outputs]
        if op.intermediates is not None:
            op.intermediates = [remap[int(t)] for t in op.intermediates]
    sg.inputs, sg.outputs = [remap[int(t)] for t in sg.inputs], [remap[int(t)] for t in sg.outputs]
    for sig in model.signatureDefs or []:
        if (sig.subgraphIndex or 0) == 0:
            for entry in list(sig.inputs or []) + list(sig.outputs or []):
                entry.tensorIndex = remap[int(entry.tensorIndex)]
    _drop_unused_buffers(model)


def _drop_unused_buffers(model) -> None:
    """Remove buffers no tensor (any subgraph) or metadata entry refers to; buffer 0 stays."""
    meta = [m.buffer for m in model.metadata or []] + list(model.metadataBuffer or [])
    used = sorted({0} | {int(t.buffer) for s in model.subgraphs for t in s.tensors} | {int(b) for b in meta})
    remap = {old: new for new, old in enumerate(used)}
    model.buffers = [model.buffers[i] for i in used]
    for s in model.subgraphs:
        for t in s.tensors:
            t.buffer = remap[int(t.buffer)]
    for m in model.metadata or []:
        m.buffer = remap[int(m.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [remap[int(b)] for b in model.metadataBuffer]


def _float_data(model, tensor) -> np.ndarray | None:
    """A float32 constant tensor's values (None for other tensors)."""
    data = model.buffers[tensor.buffer].data
    if data is None or len(data) == 0 or tensor.type != _schema().TensorType.FLOAT32:
        return None
    return np.frombuffer(bytes(bytearray(data)), dtype="<f4").reshape([int(d) for d in tensor.shape])


def _match_codes(values: np.ndarray, weights: list[tuple]) -> tuple | None:
    """The ``(codes, scales, axis)`` entry whose dequantized value ``float32(codes) · scales`` equals ``values``."""
    for codes, scales, axis in weights:
        if codes.shape != values.shape:
            continue
        shape = [-1 if d == axis else 1 for d in range(codes.ndim)] if scales.size > 1 else [1]
        if np.array_equal(codes.astype(np.float32) * scales.astype(np.float32).reshape(shape), values):
            return codes, scales, axis
    return None


def _int8_twin(model, sg, index: int, codes: np.ndarray, scales: np.ndarray, axis: int) -> int:
    """A new int8 constant tensor holding ``codes`` (per-channel ``scales`` on ``axis``, zero-point 0)."""
    schema = _schema()
    buffer = schema.BufferT()
    buffer.data = np.ascontiguousarray(codes, np.int8).view(np.uint8).reshape(-1)
    model.buffers.append(buffer)
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint, q.quantizedDimension = scales.astype(np.float32).tolist(), [0] * scales.size, axis
    t = schema.TensorT()
    t.shape, t.type, t.buffer, t.quantization = list(codes.shape), schema.TensorType.INT8, len(model.buffers) - 1, q
    t.name = _text_name(sg.tensors[index].name) + "_int8"
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _text_name(value) -> str:
    """A tensor name as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def int8_weights_behind_dequantize(buf: bytes, weights: list[tuple]) -> bytes:
    """``buf`` with every float32 constant that equals a given ``(codes, scales, axis)`` dequantized weight
    stored as those int8 codes behind a DEQUANTIZE op (``w = float32(q) · s``, bit-identical to the float
    constant: the interpreter computes it once, at allocation). A float layer then costs the int8 size.
    Returns ``buf`` unchanged when nothing matches."""
    from lowbit.export.litert_flatbuffer import _op, _opcode_index

    model = load_model(buf)
    sg, head = model.subgraphs[0], []
    used = {int(t) for op in sg.operators for t in op.inputs if t >= 0}
    for index in sorted(used):
        values = _float_data(model, sg.tensors[index])
        match = None if values is None else _match_codes(values, weights)
        if match is None:
            continue
        twin = _int8_twin(model, sg, index, *match)
        head.append(_op(_opcode_index(model, _schema().BuiltinOperator.DEQUANTIZE), [twin], [index]))
        sg.tensors[index].buffer = 0
    if not head:
        return buf
    sg.operators = head + list(sg.operators)
    drop_unused(model)
    return pack(model, len(buf))
