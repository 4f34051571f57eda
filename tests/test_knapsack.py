"""The exact multiple-choice knapsack that assembles a timestep schedule: brute force agrees, budgets are exact."""

from __future__ import annotations

import itertools
import random

import pytest

from dynasearch.errors import BudgetError
from dynasearch.search.knapsack import multiple_choice_knapsack


# ---------------------------------------------------------------------------------------------------- knapsack
def _brute_force(costs: list[list[int]], values: list[list[float]], budget: int) -> float | None:
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[g][i] for g, i in enumerate(picks))
        value = sum(values[g][i] for g, i in enumerate(picks))
        if cost <= budget and (best is None or value < best):
            best = value
    return best


def test_knapsack_matches_brute_force_on_random_small_cases() -> None:
    rng = random.Random(0)
    checked = infeasible = 0
    for _ in range(300):
        groups = rng.randint(1, 4)
        costs = [[rng.randint(1, 40) for _ in range(rng.randint(1, 5))] for _ in range(groups)]
        values = [[round(rng.uniform(0, 10), 3) for _ in c] for c in costs]
        budget = rng.randint(1, 40 * groups)
        expected = _brute_force(costs, values, budget)
        if expected is None:
            with pytest.raises(BudgetError):
                multiple_choice_knapsack(costs, values, budget)
            infeasible += 1
            continue
        solution = multiple_choice_knapsack(costs, values, budget)
        assert solution.value == pytest.approx(expected)
        assert solution.cost == sum(costs[g][i] for g, i in enumerate(solution.choices)) <= budget
        assert solution.value == pytest.approx(sum(values[g][i] for g, i in enumerate(solution.choices)))
        checked += 1
    assert checked > 150 and infeasible > 10


def _brute_force_2d(costs: list[list[tuple[int, int]]], values: list[list[float]],
                    budget: tuple[int, int]) -> float | None:
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        total = [sum(costs[g][i][d] for g, i in enumerate(picks)) for d in (0, 1)]
        value = sum(values[g][i] for g, i in enumerate(picks))
        if total[0] <= budget[0] and total[1] <= budget[1] and (best is None or value < best):
            best = value
    return best


def test_two_budget_knapsack_matches_brute_force() -> None:
    """FLOPs and latency at once: the Pareto states keep every (cost, cost, value) trade-off."""
    rng = random.Random(1)
    checked = infeasible = 0
    for _ in range(300):
        groups = rng.randint(1, 4)
        costs = [[(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(rng.randint(1, 6))] for _ in range(groups)]
        values = [[round(rng.uniform(0, 10), 3) for _ in c] for c in costs]
        budget = (rng.randint(1, 40 * groups), rng.randint(1, 40 * groups))
        expected = _brute_force_2d(costs, values, budget)
        if expected is None:
            with pytest.raises(BudgetError):
                multiple_choice_knapsack(costs, values, budget)
            infeasible += 1
            continue
        solution = multiple_choice_knapsack(costs, values, budget)
        assert solution.value == pytest.approx(expected)
        totals = tuple(sum(costs[g][i][d] for g, i in enumerate(solution.choices)) for d in (0, 1))
        assert solution.cost == totals and totals[0] <= budget[0] and totals[1] <= budget[1]
        checked += 1
    assert checked > 100 and infeasible > 10
    # a second budget that binds: the cheapest-in-FLOPs choice is too slow
    solution = multiple_choice_knapsack([[(1, 9), (5, 1)]], [[0.0, 1.0]], (10, 5))
    assert solution.choices == (1,)


def test_knapsack_with_flops_sized_costs() -> None:
    costs = [[10**11, 5 * 10**10, 2 * 10**10], [10**11, 3 * 10**10]]
    values = [[1.0, 1.5, 3.0], [0.5, 0.6]]
    solution = multiple_choice_knapsack(costs, values, 13 * 10**10)
    assert solution.choices == (0, 1) and solution.value == pytest.approx(1.6)
