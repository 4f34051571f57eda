"""Exact multiple-choice knapsack: pick one item per group, minimising total value under a total cost budget.

Used to assemble a timestep schedule from each bucket's own Pareto front. Costs are integers (FLOPs times step
counts), far too large for a table over costs, so the dynamic programme keeps, group after group, only the
Pareto-optimal partial solutions (no other partial solution is both cheaper-or-equal and better-or-equal). A
partial solution that is dominated can never complete to a better answer than the one dominating it, so the
result is exact; the number of states is bounded by the partial Pareto fronts, small for search fronts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import BudgetError

__all__ = ["KnapsackSolution", "multiple_choice_knapsack"]


@dataclass(frozen=True)
class KnapsackSolution:
    """The chosen item index of every group, with the total cost and value."""

    choices: tuple[int, ...]
    cost: int
    value: float


def _pareto(states: list[tuple[int, float, tuple[int, ...]]]) -> list[tuple[int, float, tuple[int, ...]]]:
    """Keep the states no other state beats on both cost and value (ties: the first index tuple wins)."""
    states.sort(key=lambda s: (s[0], s[1], s[2]))
    kept: list[tuple[int, float, tuple[int, ...]]] = []
    for state in states:
        if not kept or state[1] < kept[-1][1]:
            kept.append(state)
    return kept


def multiple_choice_knapsack(
    costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int
) -> KnapsackSolution:
    """One item per group with sum of costs <= `budget` and the least sum of values (exact).

    `costs[g][i]` and `values[g][i]` describe item i of group g. Raises BudgetError when even the cheapest item
    of every group together exceed the budget.
    """
    if len(costs) != len(values) or not costs:
        raise ValueError(f"costs and values must list the same (non-zero) number of groups, got {len(costs)} and {len(values)}")
    for g, (c, v) in enumerate(zip(costs, values)):
        if len(c) != len(v) or not c:
            raise ValueError(f"group {g} has {len(c)} costs and {len(v)} values; give the same non-zero number")
    cheapest = sum(min(int(x) for x in c) for c in costs)
    if cheapest > budget:
        raise BudgetError(f"budget {budget} is below the cheapest choice of every group together ({cheapest})")
    remaining_min = [sum(min(int(x) for x in c) for c in costs[g + 1:]) for g in range(len(costs))]
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for g, (group_costs, group_values) in enumerate(zip(costs, values)):
        limit = budget - remaining_min[g]  # room left for this group and the ones before it
        grown = [
            (cost + int(c), value + float(v), picks + (i,))
            for cost, value, picks in states
            for i, (c, v) in enumerate(zip(group_costs, group_values))
            if cost + int(c) <= limit
        ]
        states = _pareto(grown)
    best = min(states, key=lambda s: (s[1], s[0], s[2]))
    return KnapsackSolution(choices=best[2], cost=best[0], value=best[1])
