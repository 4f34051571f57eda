"""Assembling a timestep schedule from each bucket's Pareto front: an exact multiple-choice knapsack.

One point per bucket: cost = FLOPs x sampler steps in the bucket (and, with a latency budget, predicted latency x
steps as a second cost), value = bucket loss x bucket share, every total cost <= its budget x steps. Costs are
integers (FLOPs times step counts; latency in nanoseconds), far too large for a table over costs, so the dynamic
programme keeps, group after group, only the Pareto-optimal partial solutions (no other partial solution is
cheaper-or-equal in every cost and better-or-equal). A partial solution that is dominated can never complete to a
better answer than the one dominating it, so the result is exact; the number of states is bounded by the partial
Pareto fronts, small for search fronts.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ..errors import BudgetError
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from .buckets import TimestepContext

__all__ = ["KnapsackSolution", "knapsack_schedule", "mark_fronts", "multiple_choice_knapsack"]

Cost = tuple[int, ...]
State = tuple[Cost, float, tuple[int, ...]]


@dataclass(frozen=True)
class KnapsackSolution:
    """The chosen item index of every group, with the total cost (an int, or a tuple with several budgets) and
    value."""

    choices: tuple[int, ...]
    cost: int | Cost
    value: float


def _pareto(states: list[State]) -> list[State]:
    """Keep the states no other state beats on every cost and the value (ties: the first index tuple wins)."""
    states.sort(key=lambda s: (s[0], s[1], s[2]))
    kept: list[State] = []
    if not states or len(states[0][0]) == 1:
        for state in states:
            if not kept or state[1] < kept[-1][1]:
                kept.append(state)
        return kept
    if len(states[0][0]) != 2:
        raise ValueError(f"the knapsack takes one or two costs per item, got {len(states[0][0])}")
    # two costs: sorted by the first, a state survives unless a kept one has second cost <= and value <=; the
    # kept states' (second cost, value) form a staircase: second costs ascending, values strictly descending
    stair_cost: list[int] = []
    stair_value: list[float] = []
    for state in states:
        (_, c2), value = state[0], state[1]
        i = bisect.bisect_right(stair_cost, c2)  # stair entries with second cost <= c2: the last has the least value
        if i and stair_value[i - 1] <= value:
            continue
        kept.append(state)
        j = i
        while j < len(stair_cost) and stair_value[j] >= value:
            j += 1  # entries with a larger second cost and no better value are dominated on the staircase
        stair_cost[i:j], stair_value[i:j] = [c2], [value]
    return kept


def _as_cost(c: int | Sequence[int]) -> Cost:
    return tuple(int(x) for x in c) if isinstance(c, (tuple, list)) else (int(c),)


def multiple_choice_knapsack(
    costs: Sequence[Sequence[int | Sequence[int]]], values: Sequence[Sequence[float]], budget: int | Sequence[int]
) -> KnapsackSolution:
    """One item per group with sum of costs <= `budget` and the least sum of values (exact).

    `costs[g][i]` and `values[g][i]` describe item i of group g; a cost is an int, or a pair of ints with a pair
    `budget` (two budgets, e.g. FLOPs and latency). Raises BudgetError when even the cheapest item of every group
    together exceed a budget.
    """
    if len(costs) != len(values) or not costs:
        raise ValueError(f"costs and values must list the same (non-zero) number of groups, got {len(costs)} and "
                         f"{len(values)}")
    for g, (c, v) in enumerate(zip(costs, values, strict=True)):
        if len(c) != len(v) or not c:
            raise ValueError(f"group {g} has {len(c)} costs and {len(v)} values; give the same non-zero number")
    scalar = not isinstance(budget, (tuple, list))
    limits = _as_cost(budget)
    items = [[_as_cost(c) for c in group] for group in costs]
    if any(len(c) != len(limits) for group in items for c in group):
        raise ValueError(f"every cost must have {len(limits)} component(s), as the budget {budget}")
    dims = range(len(limits))
    group_min = [tuple(min(c[d] for c in group) for d in dims) for group in items]
    for d in dims:
        cheapest = sum(m[d] for m in group_min)
        if cheapest > limits[d]:
            shown = limits[d] if not scalar else budget
            raise BudgetError(f"budget {shown} is below the cheapest choice of every group together ({cheapest})")
    zero: Cost = tuple(0 for _ in dims)
    states: list[State] = [(zero, 0.0, ())]
    for g, (group_costs, group_values) in enumerate(zip(items, values, strict=True)):
        # room left for this group and the ones before it, in every cost
        limit = tuple(limits[d] - sum(m[d] for m in group_min[g + 1:]) for d in dims)
        grown = []
        for cost, value, picks in states:
            for i, (c, v) in enumerate(zip(group_costs, group_values, strict=True)):
                total = tuple(a + b for a, b in zip(cost, c, strict=True))
                if all(t <= lim for t, lim in zip(total, limit, strict=True)):
                    grown.append((total, value + float(v), (*picks, i)))
        states = _pareto(grown)
        if not states:  # with two budgets each can be met alone but not both at once
            raise BudgetError(f"no choice of one item per group meets every budget {tuple(limits)} at once")
    best = min(states, key=lambda s: (s[1], s[0], s[2]))
    return KnapsackSolution(choices=best[2], cost=best[0][0] if scalar else best[0], value=best[1])


def mark_fronts(candidates: pd.DataFrame) -> pd.DataFrame:
    """Add `on_front`: the candidate is on its bucket's Pareto front (duplicates collapsed): (FLOPs, loss), or
    (FLOPs, latency, loss) when the candidates have a `latency_s` column."""
    timed = "latency_s" in candidates.columns
    df = candidates.sort_values(["bucket", "flops", *(["latency_s"] if timed else []), "proxy_loss", "source"])
    df = df.reset_index(drop=True)
    if timed:
        df["on_front"] = False
        for _, group in df.groupby("bucket"):
            states = [((int(r.flops), _latency_ns(r.latency_s)), float(r.proxy_loss), (int(i),))
                      for i, r in zip(group.index, group.itertuples(), strict=True)]
            for _, _, (i,) in _pareto(states):
                df.loc[i, "on_front"] = True
        return df
    on_front = []
    best_by_bucket: dict[int, float] = {}
    for row in df.itertuples():
        best = best_by_bucket.get(row.bucket, math.inf)
        on_front.append(row.proxy_loss < best)
        best_by_bucket[row.bucket] = min(best, row.proxy_loss)
    df["on_front"] = on_front
    return df


def _latency_ns(seconds: float) -> int:
    """Seconds as integer nanoseconds (the knapsack's latency cost unit)."""
    return round(seconds * 1e9)


def knapsack_schedule(tc: TimestepContext, candidates: pd.DataFrame) -> tuple[SubnetSchedule, float]:
    """The exact best one-point-per-bucket schedule within the budget(s), and its predicted proxy loss."""
    fronts = [candidates[(candidates["bucket"] == k) & candidates["on_front"]] for k in range(len(tc.buckets))]
    values = [[float(v) * tc.weights[k] for v in front["proxy_loss"]] for k, front in enumerate(fronts)]
    if tc.ctx.latency_budget is None:
        costs: list[list] = [[int(f) * tc.counts[k] for f in front["flops"]] for k, front in enumerate(fronts)]
        solution = multiple_choice_knapsack(costs, values, tc.budget_steps)
    else:
        costs = [[(int(f) * tc.counts[k], _latency_ns(lat) * tc.counts[k])
                  for f, lat in zip(front["flops"], front["latency_s"], strict=True)] for k, front in enumerate(fronts)]
        budget = (tc.budget_steps, _latency_ns(tc.ctx.latency_budget) * len(tc.timesteps))
        solution = multiple_choice_knapsack(costs, values, budget)
    subnets = [Subnet.from_dict(json.loads(fronts[k]["subnet"].iloc[i])) for k, i in enumerate(solution.choices)]
    return tc.schedule(subnets), solution.value
