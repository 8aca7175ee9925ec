"""How a candidate model is scored: a runner makes a ``predict`` for it, a scorer compares with FP32.

* A *runner* ``runner(model, float_model) -> predict`` turns a converted model into ``predict(x) ->
  outputs``: :func:`torch_runner` runs the PyTorch simulation (engine-exact for ONNX Runtime targets);
  :func:`onnxruntime_runner` exports the model and runs it on ONNX Runtime (what ``lowbit quantize`` uses).
  ``float_model=True`` asks for the same model with every quantizer off (the FP32 reference).
* The :class:`Scorer` holds the FP32 reference outputs on the evaluation inputs and scores a predict:

  - ``agreement``: share of rows whose argmax equals the FP32 argmax;
  - ``metric``: ``metric_fn(outputs_fp32, outputs)`` or ``eval_fn(predict)`` (higher is better), else
    the agreement;
  - ``loss``: a smooth error used for ranking, ``kl`` = mean KL(softmax(FP32) ‖ softmax(out)) or
    ``mse`` = relative MSE ``Σ (ref − out)² / Σ ref²``.

* A :class:`Target` says when a score is good enough: agreement ≥ ``min_agreement`` and/or
  ``metric_fp32 − metric ≤ max_drop`` (in the metric's own units: 0.005 is half a point of accuracy).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis.layerwise import QuantizerSwitch, find_sites
from lowbit.analysis.metrics import kl_softmax, top1_agreement
from lowbit.analysis.sensitivity import model_outputs
from lowbit.export.onnx_static import export_onnx
from lowbit.export.runtime import batched_predict, make_session
from lowbit.nn import TensorQuantizer

Predict = Callable[[torch.Tensor], torch.Tensor]
Runner = Callable[[nn.Module, bool], Predict]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
EvalFn = Callable[[Predict], float]
LOSSES = ("kl", "mse")


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a converted model with every quantizer disabled (FP32 with BatchNorm folded)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, TensorQuantizer):
            m.enabled = False
    return ref


def torch_runner(batch_size: int = 64) -> Runner:
    """A runner for the PyTorch simulation, ``batch_size`` rows per forward pass (no grad)."""

    def run(model: nn.Module, float_model: bool = False) -> Predict:
        net = float_copy(model) if float_model else model
        net.eval()
        return lambda x: model_outputs(net, x, batch_size).cpu()  # beside labels and engine outputs

    run.engine = "simulation"
    return run


def relative_mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``Σ (ref − out)² / Σ ref²`` (0 when both are zero, inf when only ``ref`` is)."""
    ref, out = ref.double(), out.double()
    num, den = float((ref - out).pow(2).sum()), float(ref.pow(2).sum())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def output_loss(kind: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    """The ``kl`` or ``mse`` loss of the module doc."""
    if kind == "kl":
        return kl_softmax(ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1]))
    if kind == "mse":
        return relative_mse(ref, out)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


@dataclass(frozen=True)
class Score:
    """What one candidate scored (see module doc)."""

    metric: float
    agreement: float
    loss: float


@dataclass(frozen=True)
class Target:
    """Accuracy target of the fallback search: every given bound must hold."""

    min_agreement: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if self.min_agreement is None and self.max_drop is None:
            raise ValueError("give a target: min_agreement (e.g. 0.99) or max_drop (e.g. 0.005)")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement!r}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise ValueError(f"max_drop must be a finite number >= 0, got {self.max_drop!r}")

    def met(self, score: Score, metric_fp32: float) -> bool:
        """True when ``score`` satisfies every bound."""
        ok = True
        if self.min_agreement is not None:
            ok &= score.agreement >= self.min_agreement - 1e-12
        if self.max_drop is not None:
            ok &= metric_fp32 - score.metric <= self.max_drop + 1e-12
        return bool(ok)

    def key(self, score: Score, metric_fp32: float) -> float:
        """How close ``score`` is to the target (higher is better; ≥ 0 on every bound when met)."""
        gaps = []
        if self.min_agreement is not None:
            gaps.append(score.agreement - self.min_agreement)
        if self.max_drop is not None:
            gaps.append(self.max_drop - (metric_fp32 - score.metric))
        return min(gaps)

    def describe(self) -> str:
        """``"agreement 0.99"`` / ``"metric drop 0.005"`` (both joined by ``and``)."""
        parts = []
        if self.min_agreement is not None:
            parts.append(f"agreement {self.min_agreement:g}")
        if self.max_drop is not None:
            parts.append(f"metric drop {self.max_drop:g}")
        return " and ".join(parts)

    def headline(self, score: Score, metric_fp32: float) -> str:
        """The figure(s) the target is about, for messages: ``"0.985"`` or ``"drop 0.012"``."""
        parts = []
        if self.min_agreement is not None:
            parts.append(f"{score.agreement:.4f}")
        if self.max_drop is not None:
            parts.append(f"drop {metric_fp32 - score.metric:.4f}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        """``{"min_agreement": ..., "max_drop": ...}``."""
        return {"min_agreement": self.min_agreement, "max_drop": self.max_drop}


class Scorer:
    """FP32 reference on ``inputs`` and the scoring of candidates against it (module doc).

    Args:
        inputs: evaluation inputs ``[N, ...]``.
        reference: ``predict`` of the FP32 model (from the same runner as the candidates).
        metric_fn: ``metric_fn(outputs_fp32, outputs) -> float``; eval_fn: ``eval_fn(predict) -> float``.
        loss: ``"kl"`` or ``"mse"``.
    """

    def __init__(self, inputs: torch.Tensor, reference: Predict, metric_fn: MetricFn | None = None,
                 eval_fn: EvalFn | None = None, loss: str = "kl") -> None:
        if metric_fn is not None and eval_fn is not None:
            raise ValueError("give metric_fn or eval_fn, not both")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if not isinstance(inputs, torch.Tensor) or inputs.ndim == 0 or inputs.shape[0] == 0:
            raise ValueError("eval_inputs must be a non-empty tensor of inputs [N, ...]")
        self.inputs, self.metric_fn, self.eval_fn, self.loss = inputs, metric_fn, eval_fn, loss
        self.ref = reference(inputs).detach().float()
        self.metric_fp32 = self._metric(reference, self.ref)

    def _metric(self, predict: Predict, out: torch.Tensor) -> float:
        if self.eval_fn is not None:
            return float(self.eval_fn(predict))
        if self.metric_fn is not None:
            return float(self.metric_fn(self.ref, out))
        return top1_agreement(self.ref, out)

    def score(self, predict: Predict) -> Score:
        """Metric, agreement and loss of ``predict`` on the evaluation inputs."""
        out = predict(self.inputs).detach().float()
        if out.shape != self.ref.shape:
            raise ValueError(f"candidate output shape {tuple(out.shape)} differs from FP32 {tuple(self.ref.shape)}")
        agreement = top1_agreement(self.ref.reshape(-1, self.ref.shape[-1]), out.reshape(-1, out.shape[-1]))
        return Score(self._metric(predict, out), agreement, output_loss(self.loss, self.ref, out))


def one_layer_losses(model: nn.Module, names: Sequence[str], inputs: torch.Tensor, loss: str = "kl",
                     batch_size: int = 32, ref: torch.Tensor | None = None,
                     deadline: float = math.inf) -> tuple[dict[str, float], torch.Tensor]:
    """Output loss with only one site's quantizers on (its weight and input quantizers, every other quantizer
    off) for each of ``names`` — the analysis' "one layer quantized" sensitivity — on ``inputs``.

    Runs on a copy of the converted ``model`` (the analysis' site finder wraps functional sites); sites it
    cannot find are left out; stops when ``time.perf_counter()`` passes ``deadline``.

    Returns:
        ``({name: loss}, FP32 outputs)`` (pass the outputs back as ``ref`` to skip recomputing them).
    """
    net = copy.deepcopy(model)
    if hasattr(model, "lowbit_info"):  # GraphModule.__deepcopy__ drops extra attributes
        net.lowbit_info = model.lowbit_info
    sites = {s.name: s for s in find_sites(net)}
    switch = QuantizerSwitch(net)
    out: dict[str, float] = {}
    try:
        if ref is None:
            switch.all(False)
            ref = model_outputs(net, inputs, batch_size)
        for name in names:
            if name not in sites:
                continue
            if time.perf_counter() > deadline:
                break
            switch.only(sites[name].quantizers)
            out[name] = output_loss(loss, ref, model_outputs(net, inputs, batch_size))
    finally:
        switch.restore()
    return out, ref


def onnxruntime_runner(example_input: torch.Tensor, target: str = "onnxruntime", threads: int = 2,
                       batch_size: int = 32) -> Runner:
    """A runner that exports each candidate (FP32 with ``float_model``) and runs it on ONNX Runtime."""

    def run(model: nn.Module, float_model: bool = False):
        with tempfile.TemporaryDirectory(prefix="lowbit-search-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            try:
                export_onnx(model, example_input, path, target=target, float_model=float_model, check_parity=False)
            except Exception as exc:  # noqa: BLE001 — one line naming what could not be exported
                wide = sorted({q.spec.bits for q in model.modules()
                               if isinstance(q, TensorQuantizer) and q.spec is not None and q.spec.bits > 8})
                hint = f" ({'/'.join(map(str, wide))}-bit activations: try --act-bits 8)" if wide else ""
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise RuntimeError(f"a search candidate does not export to ONNX{hint}: {type(exc).__name__}: {first}") from exc
            session = make_session(path, threads)
        return batched_predict(session, batch_size)

    run.engine = "onnxruntime"
    return run
