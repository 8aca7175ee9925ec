"""Parity tensor by tensor: each quantized tensor of the simulation against the engine's codes, on the same inputs.

Output-level parity (``runtime.parity``) compares only the final outputs. Where float ops sit between
quantizers (LayerNorm, GELU, Softmax: ONNX Runtime has no integer kernel for them), the engine and PyTorch
compute them in float with different summation orders; a value within one ulp of a rounding tie then lands on
the neighbouring code at the next quantizer, and in a deep network such one-code flips spread to many outputs
even though every kernel is emulated exactly.

This check removes the spreading by *teacher forcing*: the INT8 file runs on ONNX Runtime with the codes of
every activation ``QuantizeLinear`` as extra outputs (the fused integer kernels write those tensors, so the
engine's fusions are kept); the simulation runs on the same inputs with each activation quantizer's output
replaced by the engine's codes, ``x̂ = (q_engine - z) · s``. Each quantizer therefore compares one segment of
the network (the ops from the previous quantizers to it) on identical inputs:

    agree(T) = #{i : q_sim(T)_i = q_engine(T)_i} / |T|

and the final output (no quantizer) is compared within one output step. The check passes when every tensor
agrees on at least ``PARITY_FRACTION`` of its elements, differs by at most one code anywhere, and every active
activation quantizer of the model was found in the file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lowbit.device import on_cpu
from lowbit.core import PerTensor
from lowbit.export.runtime import PARITY_FRACTION, ParityResult, input_feed, make_session, parity
from lowbit.nn import TensorQuantizer
from lowbit.nn.functional import QuantHardSigmoid

log = logging.getLogger(__name__)

MAX_LISTED = 5
# The check holds every activation's codes of one batch in memory: it runs on this many inputs at most.
MAX_INPUTS = 8


@dataclass(frozen=True)
class SegmentParity:
    """Result of :func:`segment_parity`.

    Attributes:
        ok: every compared tensor agrees (see module doc) and no quantizer is missing from the file.
        tensors: activation quantizers compared.
        min_fraction_equal: the lowest share of identical codes over the compared tensors.
        worst: the quantizer with that share ("" when none differ).
        max_code_diff: the largest code difference anywhere.
        output_fraction_within_step: the final output, within one output step, under teacher forcing.
        missing: active quantizers with no ``QuantizeLinear`` of their name in the file (at most 5 listed).
        differing: the tensors with any differing code, worst first (at most 5: name, share equal).
    """

    ok: bool
    tensors: int
    min_fraction_equal: float
    worst: str
    max_code_diff: int
    output_fraction_within_step: float
    missing: list = field(default_factory=list)
    differing: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def activation_q_outputs(proto: onnx.ModelProto) -> dict[str, str]:
    """``{scope: output tensor}`` of every activation ``QuantizeLinear`` named ``/<scope>/QuantizeLinear``.

    The TorchScript exporter names a module's nodes ``/<module attribute name>/<op>``; lowbit's graph
    quantizers are attributes ``lowbit_act.<key>`` with unique keys. Q nodes of constants are skipped.
    """
    constants = {init.name for init in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    found = {}
    for node in proto.graph.node:
        parts = node.name.split("/")
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or len(parts) != 3:
            continue
        if parts[2] == "QuantizeLinear":
            found.setdefault(parts[1], node.output[0])
    return found


def _engine_codes(proto: onnx.ModelProto, inputs: torch.Tensor, wanted: dict[str, str],
                  threads: int) -> tuple[dict, np.ndarray]:
    """Run ``proto`` with the ``wanted`` tensors as extra outputs: ``({scope: codes}, first output)``."""
    for tensor in wanted.values():
        proto.graph.output.append(onnx.ValueInfoProto(name=tensor))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe))
        session = make_session(probe, threads)
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(None, input_feed(session, inputs))))
    first = session.get_outputs()[0].name
    return {scope: results[tensor] for scope, tensor in wanted.items()}, results[first]


def _graph_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Active per-tensor activation quantizers the graph pass placed (``lowbit_act.<key>``), by key; a
    ``QuantHardSigmoid`` stands for the quantizer it reads back (whose Q node carries its name)."""
    out, inner = {}, set()
    for name, mod in model.named_modules():
        prefix, _, key = name.rpartition(".")
        if not prefix.endswith("lowbit_act"):
            continue
        if isinstance(mod, QuantHardSigmoid) and mod.quantizer.is_active:
            out[key] = mod
            inner.add(id(mod.quantizer))
        elif isinstance(mod, TensorQuantizer) and mod.is_active and isinstance(mod.spec.granularity, PerTensor):
            out[key] = mod
    return {k: m for k, m in out.items() if id(m) not in inner}


def _qparams(mod: nn.Module) -> tuple[torch.Tensor, int]:
    """The scale the module's output codes are read back with, and their zero-point."""
    if isinstance(mod, QuantHardSigmoid):
        return mod.read_back_scale(), int(mod.quantizer.zero_point)
    return mod.scale.reshape(()), int(mod.zero_point)


class _Forcing:
    """Forward hooks that record each quantizer's code differences and substitute the engine's codes."""

    def __init__(self, quantizers: dict[str, nn.Module], codes: dict[str, np.ndarray]) -> None:
        self.codes, self.stats, self.handles = codes, {}, []
        for key, q in quantizers.items():
            if key in codes:
                self.handles.append(q.register_forward_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(mod: nn.Module, _inputs, out: torch.Tensor):
            engine = torch.from_numpy(self.codes[key].astype(np.int64))
            if key in self.stats or engine.shape != out.shape:
                return None  # called again in the same pass, or a layout the file changed: compare once, as is
            scale, z = _qparams(mod)
            sim = torch.round(out.detach() / scale).to(torch.int64) + z
            diff = (sim - engine).abs()
            self.stats[key] = (float((diff == 0).double().mean()), int(diff.max()) if diff.numel() else 0)
            return ((engine - z).to(torch.float32) * scale).to(out.dtype)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def segment_parity(model: nn.Module, path: str | Path, inputs: torch.Tensor, threads: int = 2) -> SegmentParity | None:
    """Compare ``model`` (the simulation) with its INT8 file tensor by tensor under teacher forcing (module doc).

    Returns:
        the result (on the first ``MAX_INPUTS`` inputs), or None when the model has no graph-placed quantizers
        to match (module-swap capture).
    """
    model = on_cpu(model)  # compared with ONNX Runtime's codes on the CPU; the caller's model stays put
    quantizers = _graph_quantizers(model)
    if not quantizers:
        return None
    inputs = inputs[:MAX_INPUTS].cpu()
    proto = onnx.load(str(path))
    wanted = activation_q_outputs(proto)
    missing = sorted(k for k in quantizers if k not in wanted)
    codes, engine_out = _engine_codes(proto, inputs, {k: v for k, v in wanted.items() if k in quantizers}, threads)
    forcing = _Forcing(quantizers, codes)
    try:
        with torch.no_grad():
            sim_out = model(inputs)
    finally:
        forcing.close()
    return _summarise(forcing.stats, missing, parity(sim_out, torch.from_numpy(np.asarray(engine_out))))


def _summarise(stats: dict, missing: list, out_par) -> SegmentParity:
    ranked = sorted(stats.items(), key=lambda kv: kv[1][0])
    worst_key, (worst_frac, _) = ranked[0] if ranked else ("", (1.0, 0))
    max_diff = max((d for _, d in stats.values()), default=0)
    tensors_ok = all(frac >= PARITY_FRACTION for frac, _ in stats.values()) and max_diff <= 1
    ok = bool(stats) and tensors_ok and not missing and out_par.ok
    differing = [[k, round(frac, 6)] for k, (frac, _) in ranked if frac < 1.0][:MAX_LISTED]
    result = SegmentParity(ok, len(stats), worst_frac, worst_key if worst_frac < 1.0 else "", max_diff,
                           out_par.fraction_within_step, missing[:MAX_LISTED], differing)
    if not ok:
        log.warning("tensor-by-tensor parity failed: %s", result.to_dict())
    return result


def parity_with_segments(model: nn.Module, path: str | Path, inputs: torch.Tensor, sim_out: torch.Tensor,
                         engine_out: torch.Tensor, threads: int = 2) -> ParityResult:
    """Output-level parity; when it fails, the tensor-by-tensor check decides (stored under ``segment``).

    A model passes when its outputs agree within one step, or when every quantized tensor agrees given the
    engine's own inputs (so the output differences are float-op rounding spread through the depth, not a
    kernel or placement the simulation gets wrong).
    """
    out = parity(sim_out.cpu(), engine_out)
    if out.ok:
        return out
    seg = segment_parity(model, path, inputs, threads)
    if seg is None:
        return out
    return replace(out, ok=seg.ok, segment=seg.to_dict())
