"""The exact knapsack solvers against brute force over every choice (hypothesis), and their edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.search.knapsack import evaluate, fits, solve_dp, solve_milp


def brute_force(losses, costs, budgets):
    """Least loss over every combination that fits (None when none does): the independent reference."""
    best = None
    for picks in itertools.product(*(range(len(o)) for o in losses)):
        c = evaluate(picks, losses, costs)
        if fits(c, budgets) and (best is None or c.loss < best.loss):
            best = c
    return best


@st.composite
def instances(draw, n_constraints=1):
    n_layers = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 4)) for _ in range(n_layers)]
    losses = [[draw(st.floats(0, 10, allow_nan=False)) for _ in range(m)] for m in sizes]
    costs = [[[draw(st.integers(0, 50)) for _ in range(m)] for m in sizes] for _ in range(n_constraints)]
    budgets = [draw(st.integers(0, 60 * n_layers)) for _ in range(n_constraints)]
    return losses, costs, budgets


def _same_optimum(got, want, budgets):
    if want is None:
        assert got is None
        return
    assert got is not None and fits(got, budgets)
    assert got.loss == pytest.approx(want.loss, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(instances(1))
def test_milp_matches_brute_force_one_budget(inst):
    losses, costs, budgets = inst
    _same_optimum(solve_milp(losses, costs, budgets), brute_force(losses, costs, budgets), budgets)


@settings(max_examples=60, deadline=None)
@given(instances(2))
def test_milp_matches_brute_force_two_budgets(inst):
    losses, costs, budgets = inst
    _same_optimum(solve_milp(losses, costs, budgets), brute_force(losses, costs, budgets), budgets)


@settings(max_examples=60, deadline=None)
@given(instances(1))
def test_dp_matches_brute_force(inst):
    losses, costs, budgets = inst
    _same_optimum(solve_dp(losses, costs[0], budgets[0]), brute_force(losses, costs, budgets), budgets)


def test_solution_reports_its_picks_loss_and_costs():
    losses = [[5.0, 1.0], [4.0, 0.5]]
    costs = [[[1, 4], [1, 4]]]
    got = solve_milp(losses, costs, [5])  # only one layer can take the expensive, accurate option
    assert got.picks == (1, 0) and got.loss == 5.0 and got.costs == (5.0,)  # 1 + 4 beats 5 + 0.5
    assert solve_dp(losses, costs[0], 5) == got


def test_infeasible_budget_gives_none():
    assert solve_milp([[1.0, 2.0]], [[[3, 4]]], [2]) is None
    assert solve_dp([[1.0, 2.0]], [[3, 4]], 2) is None


def test_large_real_costs_stay_within_budget():
    """Costs of a real model's bit count (millions) with a budget a hair above a feasible total."""
    params = [864, 36_864, 1_179_648, 2_359_296, 409_600]
    losses = [[10.0 / (i + 1), 1.0 / (i + 1), 0.1 / (i + 1)] for i in range(len(params))]
    costs = [[[p * b for b in (2, 4, 8)] for p in params]]
    budget = sum(p * 4 for p in params) + 1
    got = solve_milp(losses, costs, [budget])
    assert got is not None and got.costs[0] <= budget
    assert got.loss == pytest.approx(brute_force(losses, costs, [budget]).loss)


@pytest.mark.parametrize("losses, costs, budgets, match", [
    ([], [], [], "no layer"),
    ([[]], [[[]]], [1], "no option"),
    ([[math.nan]], [[[1]]], [1], "non-finite"),
    ([[1.0, 2.0]], [[[1]]], [1], "one cost per layer option"),
    ([[1.0]], [[[1]]], [], "cost tables"),
])
def test_bad_inputs_are_refused(losses, costs, budgets, match):
    with pytest.raises(ValueError, match=match):
        solve_milp(losses, costs, budgets)


def test_dp_refuses_fractional_costs_and_huge_budgets():
    with pytest.raises(ValueError, match="integer"):
        solve_dp([[1.0]], [[1.5]], 2)
    with pytest.raises(ValueError, match="too large"):
        solve_dp([[1.0, 0.0]] * 3, [[0, 1]] * 3, 10**9)
