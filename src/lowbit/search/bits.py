"""Bit allocation: per-layer weight bits (2 / 4 / 8) and activation bits (8 / 16) under a size budget.

For every Conv / Linear layer ``l`` and option ``o = (w, a)``:

* **estimated loss** ``L[l][o]`` — measured, not modelled: the model with only layer ``l`` quantized at
  ``o`` (its weight quantizer and its input quantizers on, everything else float) is run on
  ``estimate_samples`` calibration inputs and compared with FP32 by the output loss (``kl`` =
  mean KL(softmax(FP32) ‖ softmax(out)), or relative ``mse``). The model's loss for a whole allocation is
  estimated as ``Σ_l L[l][o_l]`` (errors of different layers assumed additive, as HAWQ / AIMET do).
* **size** ``S[l][o] = params_l · w / 8`` bytes (packed; 8-bit weights count 8 even when the ONNX Runtime
  target stores 7-bit values in them), plus what no option changes: float parameters at 4 bytes, biases as
  int32, one float32 scale and one zero-point byte per output channel. MB = 10⁶ bytes.
* **BOPs** ``B[l][o] = MACs_l · w · a`` (bit operations per sample). With ``max_bops_ratio`` (default 1)
  the allocation may not exceed ``ratio ×`` the BOPs of uniform W8A8, so a 16-bit activation is paid for
  by narrower weights (W4A16 = W8A8).

The allocation ``argmin Σ L[l][o_l]`` subject to the size (``size_budget_mb``) or average weight bits
(``avg_bits``, weighted by parameter count) budget and the BOPs budget is solved exactly
(:func:`~lowbit.search.knapsack.solve_milp`). A sweep of average-bit budgets gives measured
``(size, metric)`` points: the Pareto curve.

Low-bit weights use the recipe's own weight spec with ``bits`` replaced (per-channel for the presets);
16-bit activations use the recipe's input spec with ``bits=16`` and the ``minmax`` calibrator (at 16 bits
rounding is negligible and clipping is all that percentile calibration would add).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.device import model_device
from lowbit.core import QuantSpec
from lowbit.nn import QuantLayerMixin
from lowbit.data import Data, iter_batches
from lowbit.search.candidates import CandidateBuilder, layer_pattern, quantized_layers
from lowbit.search.scoring import EvalFn, MetricFn, Runner, Scorer, one_layer_losses, torch_runner
from lowbit.search.knapsack import solve_milp
from lowbit.search.pareto import front
from lowbit.transforms.recipe import LayerRule, Recipe, machine_weight_bits

log = logging.getLogger(__name__)

MB = 1e6
FIXED_BITS_PER_CHANNEL = 32 + 8  # float32 scale + 8-bit zero-point


@dataclass(frozen=True)
class Layer:
    """A Conv / Linear layer the allocation decides: parameter count, output channels, bias size, MACs."""

    name: str
    kind: str
    params: int
    channels: int
    bias: int
    macs: int


@dataclass
class AllocationResult:
    """What :func:`allocate_bits` found (sizes in MB = 10⁶ bytes).

    Attributes:
        recipe: the input recipe plus one rule per allocated layer.
        bits: layer → ``{"weight_bits", "act_bits"}``.
        predicted_size_mb / avg_bits / bops_ratio / estimated_loss: of the allocation (module doc).
        metric / agreement / loss: measured on the evaluation inputs; ``metric_fp32`` for FP32.
        pareto: measured points ``{"avg_bits_budget", "size_mb", "avg_bits", "metric", "agreement", "loss",
            "estimated_loss", "bits", "on_front"}`` of the sweep (plus the chosen allocation).
        losses: layer → ``{"w4a8": estimated loss, ...}``.
        size_mb_fp32 / size_mb_w8: the FP32 model and uniform 8-bit weights, for reference.
    """

    recipe: Recipe
    bits: dict[str, dict]
    predicted_size_mb: float
    avg_bits: float
    bops_ratio: float
    estimated_loss: float
    metric: float
    metric_fp32: float
    agreement: float
    loss: float
    budget: dict
    pareto: list[dict] = field(default_factory=list)
    losses: dict[str, dict] = field(default_factory=dict)
    size_mb_fp32: float = 0.0
    size_mb_w8: float = 0.0
    seconds: float = 0.0
    engine: str = "simulation"

    def to_json(self) -> dict:
        """A JSON-ready dict (the ``search`` section of ``report.json``)."""
        return {
            "kind": "bit_allocation", "budget": self.budget, "bits": self.bits,
            "predicted_size_mb": self.predicted_size_mb, "avg_bits": self.avg_bits, "bops_ratio": self.bops_ratio,
            "estimated_loss": self.estimated_loss, "metric": self.metric, "metric_fp32": self.metric_fp32,
            "agreement": self.agreement, "loss": self.loss, "size_mb_fp32": self.size_mb_fp32,
            "size_mb_w8": self.size_mb_w8, "seconds": self.seconds, "engine": self.engine,
            "pareto": self.pareto, "losses": self.losses,
        }


def option_name(w: int, a: int | None) -> str:
    """``"w4a8"`` (``"w4"`` for a layer whose input stays float)."""
    return f"w{w}" if a is None else f"w{w}a{a}"


def option_specs(recipe: Recipe, layer: Layer, w: int, a: int | None) -> tuple[QuantSpec, QuantSpec | None]:
    """The weight and input specs of option ``(w, a)`` for ``layer`` (module doc)."""
    base_w, base_a = recipe.resolve(layer.name, layer.kind)
    bits = min(w, machine_weight_bits()) if recipe.target == "onnxruntime" else w
    spec_w = replace(base_w, bits=bits)
    if base_a is None or a is None:
        return spec_w, None
    return spec_w, replace(base_a, bits=a, calibrator="minmax" if a > 8 else base_a.calibrator)


def measure_layers(qmodel: nn.Module, example_input: torch.Tensor) -> list[Layer]:
    """Every quantized Conv / Linear with a weight quantizer: parameter count, channels, bias, MACs per sample.

    ``MACs = output elements per sample × weight elements per output channel`` (ConvTranspose: per input
    element), from one forward pass on ``example_input``.
    """
    kinds = dict(quantized_layers(qmodel))
    mods = {n: m for n, m in qmodel.named_modules() if n in kinds and isinstance(m, QuantLayerMixin)
            and m.weight_quantizer.spec is not None}
    macs: dict[str, int] = {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0] if mod.weight_axis == 1 else out
            macs[name] = macs.get(name, 0) + int(x[0].numel()) * int(mod.weight[0].numel())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            qmodel(example_input[:1].to(model_device(qmodel)))
    finally:
        for h in handles:
            h.remove()
    return [Layer(n, kinds[n], int(m.weight.numel()), int(m.weight.shape[m.weight_axis]),
                  0 if m.bias is None else int(m.bias.numel()), macs.get(n, 0)) for n, m in mods.items()]


def fixed_bits(model_params: int, layers: list[Layer]) -> int:
    """Bits no option changes: float parameters (32 each), biases (int32), per-channel scale + zero-point."""
    weights = sum(l.params for l in layers)
    return 32 * (model_params - weights) + sum(FIXED_BITS_PER_CHANNEL * l.channels for l in layers)


def estimate_losses(builder: CandidateBuilder, recipe: Recipe, layers: list[Layer], options: list[tuple],
                    inputs: torch.Tensor, loss: str, batch_size: int = 32) -> dict[str, dict[tuple, float]]:
    """``L[l][o]`` of the module doc: one forward pass per (layer, option) on ``inputs``."""
    table: dict[str, dict[tuple, float]] = {l.name: {} for l in layers}
    ref = None
    for w, a in options:
        rules = [LayerRule(layer_pattern(l.name), *option_specs(recipe, l, w, a)) for l in layers]
        model = builder.build(recipe.with_rules(*rules))
        losses, ref = one_layer_losses(model, [l.name for l in layers], inputs, loss, batch_size, ref)
        missing = [l.name for l in layers if l.name not in losses]
        if missing:
            raise ValueError(f"layer {missing[0]} cannot be switched on alone (not found in the traced graph)")
        for name, v in losses.items():
            table[name][(w, a)] = v
        log.info("bit allocation: estimated the loss of %s for %d layers", option_name(w, a), len(layers))
    return table


@dataclass
class _Problem:
    """Everything one allocation run solves and measures with."""

    builder: CandidateBuilder
    scorer: Scorer
    runner: Runner
    recipe: Recipe
    layers: list[Layer]
    options: list[tuple]
    table: dict[str, dict[tuple, float]]
    fixed: int
    bops: float | None

    @property
    def weights(self) -> int:
        return sum(l.params for l in self.layers)

    def solve(self, budget_bits: float):
        """The exact allocation for a weight-bit budget (and the BOPs budget); None when infeasible."""
        losses = [[self.table[l.name][o] for o in self.options] for l in self.layers]
        costs = [[[l.params * w for w, _ in self.options] for l in self.layers]]
        budgets = [budget_bits]
        if self.bops is not None:
            costs.append([[l.macs * w * (a or 0) for w, a in self.options] for l in self.layers])
            budgets.append(self.bops)
        return solve_milp(losses, costs, budgets)

    def recipe_for(self, picks) -> Recipe:
        return self.recipe.with_rules(*(LayerRule(layer_pattern(l.name), *option_specs(self.recipe, l, *self.options[p]))
                                        for l, p in zip(self.layers, picks)))

    def measure(self, picks) -> dict:
        """Size, mean bits, BOPs ratio and estimated loss of an allocation, and its measured scores."""
        chosen = [self.options[p] for p in picks]
        weight_bits = sum(l.params * w for l, (w, _) in zip(self.layers, chosen))
        macs8 = sum(l.macs * 64 for l in self.layers)
        counts: dict[str, int] = {}
        for w, a in chosen:
            counts[option_name(w, a)] = counts.get(option_name(w, a), 0) + 1
        s = self.scorer.score(self.runner(self.builder.build(self.recipe_for(picks)), False))
        point = {"size_mb": (self.fixed + weight_bits) / 8 / MB, "avg_bits": weight_bits / self.weights,
                 "bops_ratio": sum(l.macs * w * (a or 0) for l, (w, a) in zip(self.layers, chosen)) / macs8
                 if macs8 else 0.0,
                 "estimated_loss": sum(self.table[l.name][o] for l, o in zip(self.layers, chosen)), "bits": counts,
                 "metric": s.metric, "agreement": s.agreement, "loss": s.loss, "picks": list(picks)}
        log.info("bit allocation: %.4g MB, %.2f avg bits → metric %.4f, agreement %.4f",
                 point["size_mb"], point["avg_bits"], s.metric, s.agreement)
        return point

    def sweep(self, levels: list[float], points: list[dict], deadline: float) -> None:
        """Add a measured point per average-bits level (skipping repeated allocations) until ``deadline``."""
        for level in levels:
            if time.perf_counter() > deadline:
                log.info("bit allocation: time budget spent, Pareto sweep stopped at %d points", len(points))
                break
            c = self.solve(level * self.weights)
            if c is None or any(p["picks"] == list(c.picks) for p in points):
                continue
            points.append(dict(self.measure(c.picks), avg_bits_budget=level, chosen=False))
        on = front([(p["size_mb"], p["metric"]) for p in points])
        for i, p in enumerate(points):
            p["on_front"] = i in on
        points.sort(key=lambda p: p["size_mb"])


def _head(data: Data, n: int) -> torch.Tensor:
    """The first ``n`` calibration inputs as one tensor (batches may be tensors or ``(inputs, labels)``)."""
    if callable(data) and not isinstance(data, torch.Tensor) and not hasattr(data, "__iter__"):
        raise ValueError("bit allocation needs calibration data as a tensor or batches, not a forward_loop")
    rows, seen = [], 0
    for batch in iter_batches(data, n):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"bit allocation needs tensor batches, got {type(x).__name__}")
        rows.append(x[: n - seen])
        seen += rows[-1].shape[0]
        if seen >= n:
            break
    if not rows:
        raise ValueError("calibration data is empty: no batch was seen")
    return torch.cat(rows)


def _check_bits(weight_bits, act_bits, size_budget_mb, avg_bits, max_bops_ratio) -> None:
    if size_budget_mb is None and avg_bits is None:
        raise ValueError("give a budget: size_budget_mb (e.g. 2.5) or avg_bits (e.g. 6)")
    if not weight_bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in weight_bits):
        raise ValueError(f"weight_bits must be integers in [2, 8], got {weight_bits!r}")
    if not act_bits or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16 for b in act_bits):
        raise ValueError(f"act_bits must be integers in [2, 16], got {act_bits!r}")
    for name, v in (("size_budget_mb", size_budget_mb), ("avg_bits", avg_bits), ("max_bops_ratio", max_bops_ratio)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")


def allocate_bits(model: nn.Module, calib_data: Data, eval_inputs: torch.Tensor, recipe: Recipe, *,
                  size_budget_mb: float | None = None, avg_bits: float | None = None,
                  weight_bits: tuple[int, ...] = (2, 4, 8), act_bits: tuple[int, ...] = (8, 16),
                  max_bops_ratio: float | None = 1.0, metric_fn: MetricFn | None = None, eval_fn: EvalFn | None = None,
                  runner: Runner | None = None, loss: str = "kl", estimate_samples: int = 32,
                  pareto_points: int = 5, budget_seconds: float = 600.0,
                  example_input: torch.Tensor | None = None) -> AllocationResult:
    """Per-layer weight / activation bits minimising the estimated loss under the budgets (module doc).

    Args:
        model: the FLOAT model (left untouched); calib_data: calibration data (tensor or batches).
        eval_inputs: inputs ``[N, ...]`` the allocations are measured on.
        recipe: the recipe whose specs the options vary (its float rules are kept).
        size_budget_mb: model size budget (MB = 10⁶ bytes); avg_bits: mean weight bits budget.
        weight_bits / act_bits: the options; max_bops_ratio: BOPs ≤ ratio × uniform W8A8 (None: no limit).
        metric_fn / eval_fn / runner / loss: as for :func:`lowbit.search.fallback`.
        estimate_samples: calibration inputs the per-layer loss estimate runs on.
        pareto_points: average-bit budgets swept (evenly from min to max weight bits); 0: no sweep.
        budget_seconds: time after which the sweep stops (the estimate and the chosen point always run).
    """
    t0 = time.perf_counter()
    _check_bits(weight_bits, act_bits, size_budget_mb, avg_bits, max_bops_ratio)
    recipe = recipe.for_machine()
    runner = runner or torch_runner()
    example_input = eval_inputs[:1] if example_input is None else example_input
    builder = CandidateBuilder(model, calib_data, example_input)
    base = builder.build(recipe)
    layers = measure_layers(base, example_input)
    if not layers:
        raise ValueError("the recipe quantizes no Conv / Linear weight: nothing to allocate")
    options = list(itertools.product(sorted(set(weight_bits)), sorted(set(act_bits))))
    table = estimate_losses(builder, recipe, layers, options, _head(calib_data, estimate_samples), loss)
    n_params = sum(p.numel() for p in base.parameters())  # after BatchNorm folding, as exported
    prob = _Problem(builder, Scorer(eval_inputs, runner(base, True), metric_fn, eval_fn, loss), runner, recipe, layers,
                    options, table, fixed_bits(n_params, layers),
                    None if max_bops_ratio is None else max_bops_ratio * sum(l.macs * 64 for l in layers))
    limits = [v for v in (size_budget_mb * 8 * MB - prob.fixed if size_budget_mb else None,
                          avg_bits * prob.weights if avg_bits else None) if v is not None]
    choice = prob.solve(min(limits))
    if choice is None:
        smallest = (prob.fixed + prob.weights * min(weight_bits)) / 8 / MB
        raise ValueError(f"no allocation fits the budget (size {size_budget_mb} MB, avg bits {avg_bits}): the "
                         f"smallest is {smallest:.4g} MB with every weight at {min(weight_bits)} bits")
    main = prob.measure(choice.picks)
    points = [dict(main, avg_bits_budget=None, chosen=True)]
    prob.sweep(_levels(weight_bits, pareto_points), points, t0 + budget_seconds)
    for p in points:
        p.pop("picks")
    return AllocationResult(
        prob.recipe_for(choice.picks),
        {l.name: {"weight_bits": options[p][0], "act_bits": options[p][1]} for l, p in zip(layers, choice.picks)},
        main["size_mb"], main["avg_bits"], main["bops_ratio"], main["estimated_loss"], main["metric"],
        prob.scorer.metric_fp32, main["agreement"], main["loss"],
        {"size_budget_mb": size_budget_mb, "avg_bits": avg_bits, "max_bops_ratio": max_bops_ratio,
         "weight_bits": list(weight_bits), "act_bits": list(act_bits)},
        points, {n: {option_name(*o): v for o, v in t.items()} for n, t in table.items()},
        32 * n_params / 8 / MB, (prob.fixed + 8 * prob.weights) / 8 / MB,
        time.perf_counter() - t0, getattr(runner, "engine", "custom"))


def _levels(weight_bits, n: int) -> list[float]:
    lo, hi = min(weight_bits), max(weight_bits)
    if n <= 0:
        return []
    if n == 1 or lo == hi:
        return [float(hi)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
