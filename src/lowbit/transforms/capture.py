"""Graph capture: ``torch.export`` (ATen IR) first, ``torch.fx`` symbolic tracing second, module swap last.

``torch.export`` runs the model on an example input and records every ATen op it calls, so it sees through
library code that ``torch.fx`` cannot trace (``scaled_dot_product_attention`` with tensor arguments,
``**kwargs`` forwards, data-dependent Python). Its graph is turned into a plain ``torch.fx.GraphModule``
that the rest of lowbit (BN folding, Q/DQ placement, the TorchScript ONNX exporter) works on:

1. ATen overloads become the ``torch`` functions of the same name (``aten.add.Tensor`` → ``torch.add``,
   ``aten.view`` → ``Tensor.view``), in-place ops their out-of-place twins, and ``sym_size`` a ``Tensor.size``
   call, so the graph re-traces with a dynamic batch axis;
2. calls that are one module's work become calls of that module again, under its qualified name, so recipe
   rules and quantized twins apply (``transforms.lift``: conv / linear on a layer's own parameters, inlined
   pools and activations, ``addmm`` projections);
3. the captured graph is run on the example input and compared with the model; a mismatch is a failure
   of the capture, not something to quantize.

Data-dependent control flow (``if x.sum() > 0:``) is specialised to the example input with
``torch.export.draft_export``, which takes the branch the example takes; the capture line names the source line
of each specialised branch (the exported ONNX, a trace, holds that branch only as well).
"""

from __future__ import annotations

import linecache
import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.transforms.lift import _attr, _size, lift_modules

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """Result of :func:`capture`: the graph (None for module swap), the path used and why others failed."""

    graph_module: fx.GraphModule | None
    path: str
    fallback_reasons: list[str] = field(default_factory=list)
    specialised: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: the capture path and, on fallback, why the earlier paths failed."""
        line = f"graph capture: {self.path}"
        if self.fallback_reasons:
            line += " (" + "; ".join(self.fallback_reasons) + ")"
        if self.specialised:
            line += f"; graph specialised to the example input ({', '.join(self.specialised[:3])})"
        return line


def _slice(x: torch.Tensor, dim: int = 0, start=None, end=None, step: int = 1) -> torch.Tensor:
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


# ATen ops whose torch-namespace twin does not exist or has another signature.
SPECIAL = {
    "sym_size": _size,
    "slice": _slice,
    "linear": F.linear,
    "gelu": F.gelu,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "hardtanh": F.hardtanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "mish": F.mish,
    "softplus": F.softplus,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "avg_pool2d": F.avg_pool2d,
    "pad": F.pad,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "upsample_nearest2d": torch._C._nn.upsample_nearest2d,
    "upsample_bilinear2d": torch._C._nn.upsample_bilinear2d,
}
# ATen ops that are Tensor methods only.
METHODS = {"view", "expand", "contiguous", "type_as", "expand_as", "repeat", "new_zeros", "new_ones", "fill_"}


ASSERTS = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg,
           torch.ops.aten.sym_constrain_range_for_size.default)


def _torch_twin(op) -> tuple[str, object] | None:
    """``("call_function", fn)`` or ``("call_method", name)`` for an ATen overload, or None to keep it."""
    name = op._opname
    if name.endswith("_") and not name.startswith("_") and name.rstrip("_") not in METHODS:
        name = name[:-1]  # in-place → out-of-place (the graph is checked against the model afterwards)
    if name in SPECIAL:
        return "call_function", SPECIAL[name]
    if name in METHODS:
        return "call_method", name
    fn = getattr(torch, name, None)
    if callable(fn):
        return "call_function", fn
    fn = getattr(torch._C._nn, name, None)
    if callable(fn):
        return "call_function", fn
    return None


def _normalise(gm: fx.GraphModule) -> list[str]:
    """Rewrite ATen overloads as torch calls (in place); returns the ops kept as ATen calls."""
    kept = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" or node.target in ASSERTS:
            gm.graph.erase_node(node)  # run-time checks of the specialisation: the graph is used as captured
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        twin = _torch_twin(node.target)
        if twin is None:
            kept.add(str(node.target))
            continue
        node.op, node.target = twin
    return sorted(kept)


def _check_equal(gm: fx.GraphModule, model: nn.Module, example: torch.Tensor) -> None:
    """Raise when the captured graph does not compute what the model computes on ``example``."""
    with torch.no_grad():
        ref, got = model(example), gm(example)
    ref, got = _first_tensor(ref), _first_tensor(got)
    if ref.shape != got.shape:
        raise RuntimeError(f"captured graph gives shape {tuple(got.shape)}, the model {tuple(ref.shape)}")
    tol = 1e-4 * float(ref.abs().max()) + 1e-5
    err = float((ref.float() - got.float()).abs().max())
    if err > tol:
        raise RuntimeError(f"captured graph differs from the model by {err:.3g} (tolerance {tol:.3g})")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


def _module_root(model: nn.Module, ep_module: fx.GraphModule) -> dict:
    """Every attribute the graph reads, taken from the original model where it exists (shared tensors)."""
    root = {}
    for node in ep_module.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        try:
            root[target] = model.get_submodule(target) if node.op == "call_module" else _attr(model, target)
        except AttributeError:
            root[target] = _attr(ep_module, target)
    return root


def _branch_from_error(exc: BaseException) -> list[str]:
    """The user line named by a data-dependent error's message (``File "…", line N, in forward``), if any.

    draft_export's own report can come back without failures (its log capture depends on global logging state
    other libraries may have changed); the strict attempt's error still names the line."""
    found = re.findall(r'File "([^"]+)", line (\d+), in \w+', str(exc))
    if not found:
        return []
    path, line = found[-1]
    source = linecache.getline(path, int(line)).strip()
    return [f"line {line}: {source[:80]}"] if source else []


def _draft_export(model: nn.Module, batch: torch.Tensor, dims: tuple, error: BaseException) -> tuple:
    """``torch.export.draft_export``: data-dependent branches are taken as the example input takes them.

    Returns:
        the program and one line per specialised branch (``line N: source``), from draft_export's report or,
        when that is empty, from ``error`` (the failed strict attempt).
    """
    quiet = [logging.getLogger(n) for n in ("torch.export._draft_export", "torch.fx.experimental.symbolic_shapes")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        ep = torch.export.draft_export(model, (batch,), dynamic_shapes=dims, strict=False)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    branches = []
    for failure in getattr(ep, "_report", None).failures if getattr(ep, "_report", None) else []:
        frames = (failure.data or {}).get("user_stack") or [{}]
        frame = frames[-1]
        branches.append(f"line {frame.get('line', '?')}: {str(frame.get('loc', '?')).strip()[:80]}")
    return ep, branches or _branch_from_error(error) or ["a data-dependent value"]


def export_capture(model: nn.Module, example: torch.Tensor) -> Capture:
    """Capture ``model`` with ``torch.export`` (dynamic batch axis) as a plain, checked ``fx.GraphModule``.

    Raises:
        Exception: whatever ``torch.export`` raises, or RuntimeError when the captured graph does not match.
    """
    batch2 = torch.cat([example[:1], example[:1]])  # batch 1 would be specialised to a constant
    dims = ({0: torch.export.Dim.AUTO},)
    specialised: list[str] = []
    try:
        ep = torch.export.export(model, (batch2,), dynamic_shapes=dims, strict=False)
    except Exception as exc:  # noqa: BLE001
        if "data-dependent" not in str(exc) and "DataDependent" not in type(exc).__name__:
            raise
        ep, specialised = _draft_export(model, batch2, dims, exc)
    flat = ep.module()
    root = _module_root(model, flat)
    graph = flat.graph
    gm = fx.GraphModule(root, graph)
    kept = _normalise(gm)
    gm.graph.eliminate_dead_code()
    if kept:
        log.debug("ATen ops kept as they are: %s", ", ".join(kept))
    gm.graph.lint()
    gm.recompile()
    lifted = lift_modules(gm, model)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    _strip_output_pytree(gm)
    _check_equal(gm, model, example)
    log.debug("torch.export: %d layers lifted back to modules", lifted)
    return Capture(gm, "torch.export", specialised=specialised)


def _strip_output_pytree(gm: fx.GraphModule) -> None:
    """Make the graph take one positional input and return its first tensor output directly."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    while isinstance(value, (list, tuple)) and len(value) >= 1:
        value = value[0]
    if isinstance(value, dict):
        value = next(iter(value.values()))
    out.args = (value,)
    gm._out_spec = None
    gm._in_spec = None
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


CAPTURE_CHOICES = ("auto", "export", "fx", "swap")


def capture_model(model: nn.Module, example_input: torch.Tensor | None, how: str = "auto") -> Capture:
    """Capture ``model``'s graph: ``torch.export`` first, then ``torch.fx``; ``Capture.graph_module`` is None
    when both fail (the caller falls back to module swap). ``Capture.describe()`` is the one line to show.

    Args:
        how: ``auto`` (export → fx → module swap), or one path only: ``export`` (failure raises), ``fx`` (fx →
            module swap, the pre-export behaviour), ``swap`` (module swap).
    """
    if how not in CAPTURE_CHOICES:
        raise ValueError(f"unknown capture {how!r}; valid: {', '.join(CAPTURE_CHOICES)}")
    if how == "swap":
        return Capture(None, "module swap", ["module swap requested"])
    if how == "export":
        if example_input is None:
            raise ValueError("capture 'export' needs an example input")
        return export_capture(model, example_input)
    reasons = []
    if how == "auto" and any(isinstance(m, nn.RNNBase) for m in model.modules()):
        how = "fx"  # torch.fx keeps LSTM / GRU as one named module call; torch.export inlines them
        reasons.append("recurrent layers: torch.fx keeps them whole")
    if how == "fx":
        reasons = reasons or ["torch.fx requested"]
    elif example_input is None:
        reasons.append("torch.export needs an example input")
    else:
        try:
            return export_capture(model, example_input)
        except Exception as exc:  # noqa: BLE001 — any failure means: try the next path
            reasons.append(f"torch.export failed: {_one_line(exc)}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"torch.fx failed: {_one_line(exc)}")
        return Capture(None, "module swap", reasons)
    return Capture(gm, "torch.fx", reasons)
