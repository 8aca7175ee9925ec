"""Exact multiple-choice knapsack: one option per layer, least summed loss, every budget respected.

    minimise  Σ_l loss[l][o_l]      subject to   Σ_l cost[k][l][o_l] ≤ budget[k]   for every constraint k

Two exact solvers:

* :func:`solve_milp` — the 0/1 integer program ``x[l, o] ∈ {0, 1}``, ``Σ_o x[l, o] = 1`` solved by HiGHS
  (``scipy.optimize.milp``) with a zero optimality gap; any number of constraints, real costs.
* :func:`solve_dp` — dynamic programming over the budget for ONE constraint with integer costs
  (``best[c] = min_o best_prev[c − cost[l][o]] + loss[l][o]``), an independent check of the first.

Both return None when no choice fits the budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

DP_MAX_STATES = 5_000_000  # budget cells the DP may allocate (after removing per-layer minimum costs and gcd)
FEASIBILITY_RTOL = 1e-9


@dataclass(frozen=True)
class Choice:
    """A solution: the option index picked for each layer, its summed loss and its summed costs."""

    picks: tuple[int, ...]
    loss: float
    costs: tuple[float, ...]


def _check(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[Sequence[float]]], budgets: Sequence[float]) -> None:
    if len(costs) != len(budgets):
        raise ValueError(f"{len(costs)} cost tables for {len(budgets)} budgets")
    if not losses:
        raise ValueError("no layer to allocate")
    for layer, opts in enumerate(losses):
        if not opts:
            raise ValueError(f"layer {layer} has no option")
        if not all(math.isfinite(v) for v in opts):
            raise ValueError(f"layer {layer} has a non-finite loss: {list(opts)}")
    for k, table in enumerate(costs):
        if len(table) != len(losses) or any(len(t) != len(o) for t, o in zip(table, losses)):
            raise ValueError(f"cost table {k} does not have one cost per layer option")
        if not all(math.isfinite(v) for t in table for v in t) or not math.isfinite(budgets[k]):
            raise ValueError(f"cost table {k} or its budget is not finite")


def evaluate(picks: Sequence[int], losses, costs) -> Choice:
    """The :class:`Choice` made of ``picks`` (summed loss and costs, in the inputs' order)."""
    loss = math.fsum(losses[l][o] for l, o in enumerate(picks))
    totals = tuple(math.fsum(table[l][o] for l, o in enumerate(picks)) for table in costs)
    return Choice(tuple(int(o) for o in picks), loss, totals)


def fits(choice: Choice, budgets: Sequence[float]) -> bool:
    """True when every summed cost is within its budget (relative tolerance ``FEASIBILITY_RTOL``)."""
    return all(c <= b + FEASIBILITY_RTOL * max(abs(b), 1.0) for c, b in zip(choice.costs, budgets))


def solve_milp(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[Sequence[float]]],
               budgets: Sequence[float]) -> Choice | None:
    """Exact solution by integer programming (see module doc); None when infeasible.

    Args:
        losses: ``losses[l][o]``, the loss of option ``o`` of layer ``l``.
        costs: ``costs[k][l][o]``, the cost of that option under constraint ``k``.
        budgets: ``budgets[k]``.
    """
    _check(losses, costs, budgets)
    sizes = [len(o) for o in losses]
    starts = np.cumsum([0] + sizes[:-1])
    n = sum(sizes)
    c = np.array([v for opts in losses for v in opts], dtype=np.float64)
    a_eq = np.zeros((len(losses), n))
    for l, (s, m) in enumerate(zip(starts, sizes)):
        a_eq[l, s:s + m] = 1.0
    constraints = [LinearConstraint(a_eq, 1.0, 1.0)]
    limits = list(budgets)
    for _ in range(4):  # tighten a budget HiGHS overshot within its tolerance, then solve again
        if costs:
            rows, ub = [], []
            for table, b in zip(costs, limits):
                row = np.array([v for t in table for v in t], dtype=np.float64)
                scale = max(np.abs(row).max(initial=0.0), abs(b), 1e-300)  # rows of order 1 for the solver
                rows.append(row / scale)
                ub.append(b / scale)
            constraints = [constraints[0], LinearConstraint(np.array(rows), -np.inf, np.array(ub))]
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.status == 2 or res.x is None:
            return None
        if res.status != 0:
            raise RuntimeError(f"bit allocation solver failed: {res.message}")
        picks = [int(np.argmax(res.x[s:s + m])) for s, m in zip(starts, sizes)]
        choice = evaluate(picks, losses, costs)
        if fits(choice, budgets):
            return choice
        limits = [lim - max(0.0, got - b) - FEASIBILITY_RTOL * max(abs(b), 1.0)
                  for lim, got, b in zip(limits, choice.costs, budgets)]
    raise RuntimeError("bit allocation solver kept returning choices over budget")


def solve_dp(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int) -> Choice | None:
    """Exact solution for one constraint with integer costs, by dynamic programming over the budget.

    Per-layer minimum costs are taken out of the budget and all costs divided by their gcd first, so the
    table has ``(budget − Σ min cost) / gcd + 1`` cells per layer (at most ``DP_MAX_STATES``).
    """
    _check(losses, [costs], [budget])
    if not all(float(v).is_integer() for t in costs for v in t) or not float(budget).is_integer():
        raise ValueError("solve_dp needs integer costs and budget")
    base = [min(int(v) for v in t) for t in costs]
    extra = [[int(v) - b for v in t] for t, b in zip(costs, base)]
    room = int(budget) - sum(base)
    if room < 0:
        return None
    g = reduce(math.gcd, [v for t in extra for v in t], 0) or 1
    cap = room // g
    if (cap + 1) * len(losses) > DP_MAX_STATES:
        raise ValueError(f"budget of {cap + 1} cells is too large for the DP; use solve_milp")
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(losses), cap + 1), dtype=np.int16)
    for l, (opts, steps) in enumerate(zip(losses, extra)):
        new = np.full(cap + 1, np.inf)
        for o, (loss, step) in enumerate(zip(opts, steps)):
            w = step // g
            if w > cap:
                continue
            cand = best[:cap + 1 - w] + loss
            better = cand < new[w:]
            new[w:][better] = cand[better]
            back[l, w:][better] = o
        best = new
    if not np.isfinite(best).any():
        return None
    cell = int(np.argmin(best))
    picks = []
    for l in range(len(losses) - 1, -1, -1):
        o = int(back[l, cell])
        picks.append(o)
        cell -= extra[l][o] // g
    return evaluate(picks[::-1], losses, [costs])
