"""Assembling a timestep schedule from each bucket's Pareto front: an exact multiple-choice knapsack.

One point per bucket: cost = FLOPs x sampler steps in the bucket, value = bucket loss x bucket share, total cost
<= budget x steps. Costs are integers (FLOPs times step counts), far too large for a table over costs, so the
dynamic programme keeps, group after group, only the Pareto-optimal partial solutions (no other partial solution
is both cheaper-or-equal and better-or-equal). A partial solution that is dominated can never complete to a
better answer than the one dominating it, so the result is exact; the number of states is bounded by the partial
Pareto fronts, small for search fronts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from ..errors import BudgetError
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from .buckets import TimestepContext

__all__ = ["KnapsackSolution", "knapsack_schedule", "mark_fronts", "multiple_choice_knapsack"]


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


def mark_fronts(candidates: pd.DataFrame) -> pd.DataFrame:
    """Add `on_front`: the candidate is on its bucket's (FLOPs, loss) Pareto front (duplicates collapsed)."""
    df = candidates.sort_values(["bucket", "flops", "proxy_loss", "source"]).reset_index(drop=True)
    on_front = []
    best_by_bucket: dict[int, float] = {}
    for row in df.itertuples():
        best = best_by_bucket.get(row.bucket, math.inf)
        on_front.append(row.proxy_loss < best)
        best_by_bucket[row.bucket] = min(best, row.proxy_loss)
    df["on_front"] = on_front
    return df


def knapsack_schedule(tc: TimestepContext, candidates: pd.DataFrame) -> tuple[SubnetSchedule, float]:
    """The exact best one-point-per-bucket schedule within the budget, and its predicted proxy loss."""
    fronts = [candidates[(candidates["bucket"] == k) & candidates["on_front"]] for k in range(len(tc.buckets))]
    costs = [[int(f) * tc.counts[k] for f in front["flops"]] for k, front in enumerate(fronts)]
    values = [[float(v) * tc.weights[k] for v in front["proxy_loss"]] for k, front in enumerate(fronts)]
    solution = multiple_choice_knapsack(costs, values, tc.budget_steps)
    subnets = [Subnet.from_dict(json.loads(fronts[k]["subnet"].iloc[i])) for k, i in enumerate(solution.choices)]
    return tc.schedule(subnets), solution.value
