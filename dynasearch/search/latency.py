"""A latency budget for the static search: a second Optuna constraint on a latency table's prediction.

`dynasearch search --latency 40ms --latency-table FILE` (alone or with ``--flops``) loads the table
(:class:`dynasearch.cost.latency_table.LatencyTable`, measured by ``dynasearch bench latency-table``), checks that
it was measured for the supernet's architecture and covers every choice of the space, and adds the constraint
``latency = (predicted - budget) / budget`` to every trial (feasible: <= 0). The outputs add ``latency_ms``
(predicted, at the table's batch and device) to trials.csv, pareto.csv and baseline.csv, ``feasible`` requires
both budgets, best.json records the latency budget and each exported subnet's predicted and measured latency,
and ``latency.csv`` lists the exported subnets' predicted and measured latency against the budget. The tables
themselves are assembled by :func:`dynasearch.search.outputs.write_outputs`; these are its latency pieces.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
import torch

from ..cost.latency import measure_latency, measure_schedule_latency
from ..cost.latency_table import format_latency
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from ..slicing import slice_schedule, slice_subnet
from .context import SearchContext

__all__ = [
    "ATTR_LATENCY",
    "budget_row",
    "latency_note",
    "latency_rows",
    "measure_exported",
    "measure_schedules",
    "predicted_ms",
    "set_latency_constraint",
    "with_latency",
]

ATTR_LATENCY = "latency_s"
MEASURE_WARMUP, MEASURE_REPEATS = 2, 5


def set_latency_constraint(ctx: SearchContext, trial: optuna.Trial, subnet: Subnet) -> float:
    """Set the trial's `latency` constraint and its predicted latency; returns the prediction (seconds)."""
    assert ctx.latency_table is not None and ctx.latency_budget is not None
    predicted = ctx.latency_table.predict(subnet)
    trial.set_constraint("latency", (predicted - ctx.latency_budget) / ctx.latency_budget)
    trial.set_user_attr(ATTR_LATENCY, predicted)
    return predicted


def with_latency(ctx: SearchContext, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with latency_ms (predicted from its subnet column) and feasible requiring both budgets."""
    if frame.empty or "subnet" not in frame:
        return frame
    table, budget = ctx.latency_table, ctx.latency_budget
    assert table is not None and budget is not None
    frame = frame.copy()
    seconds = [table.predict(Subnet.from_dict(json.loads(s))) if isinstance(s, str) else float("nan")
               for s in frame["subnet"]]
    frame["latency_ms"] = [1e3 * s for s in seconds]
    frame["flops_feasible"] = frame["feasible"].astype(bool)
    frame["latency_feasible"] = [s <= budget for s in seconds]
    frame["feasible"] = frame["flops_feasible"] & frame["latency_feasible"]
    return frame


def measure_exported(ctx: SearchContext, subnets: list[Subnet]) -> list[float | None]:
    """Measured seconds of each subnet sliced, on the table's device at its batch and (CPU) thread count (None
    where that device is not here)."""
    return _measured(ctx, [lambda s=subnet: _time_subnet(ctx, s) for subnet in subnets])


def measure_schedules(ctx: SearchContext, schedules: list[SubnetSchedule], timesteps: list[int]) -> list[float | None]:
    """Measured mean seconds per sampler step of each schedule, sliced to its union and switching subnets per
    bucket as sampling does (each bucket timed once, weighted by its steps); None where the device is not here."""
    return _measured(ctx, [lambda s=schedule: _time_schedule(ctx, s, timesteps) for schedule in schedules])


def _measured(ctx: SearchContext, calls: list[Callable[[], float]]) -> list[float | None]:
    """Run each timing call at the table's (CPU) thread count; all None when the table's device is not here."""
    table = ctx.latency_table
    assert table is not None
    if table.device == "cuda" and not torch.cuda.is_available():
        return [None] * len(calls)
    threads, before = table.machine.get("threads"), torch.get_num_threads()
    try:
        if table.device == "cpu" and isinstance(threads, int) and threads > 0:
            torch.set_num_threads(threads)  # the thread count the table was measured with
        return [call() for call in calls]
    finally:
        torch.set_num_threads(before)


def _dtype(ctx: SearchContext) -> torch.dtype | None:
    assert ctx.latency_table is not None
    return torch.bfloat16 if ctx.latency_table.dtype == "bfloat16" else None


def _time_subnet(ctx: SearchContext, subnet: Subnet) -> float:
    """Seconds of one forward of `subnet` sliced, at the table's batch on its device."""
    assert ctx.latency_table is not None
    small = slice_subnet(ctx.model, subnet).to(torch.device(ctx.latency_table.device))
    return measure_latency(small, batch=ctx.latency_table.batch, warmup=MEASURE_WARMUP, repeats=MEASURE_REPEATS,
                           dtype=_dtype(ctx))


def _time_schedule(ctx: SearchContext, schedule: SubnetSchedule, timesteps: list[int]) -> float:
    """Mean seconds per sampler step of `schedule` sliced to its union (each bucket's subnet timed once)."""
    table = ctx.latency_table
    assert table is not None
    small = slice_schedule(ctx.model, schedule).to(torch.device(table.device))
    return measure_schedule_latency(small, schedule, timesteps, batch=table.batch, warmup=MEASURE_WARMUP,
                                    repeats=MEASURE_REPEATS, dtype=_dtype(ctx))


def predicted_ms(ctx: SearchContext, subnet: Subnet | None = None) -> float:
    """The table's predicted latency of `subnet` (the full model when None), in milliseconds."""
    assert ctx.latency_table is not None
    return 1e3 * ctx.latency_table.predict(subnet)


def latency_note(ctx: SearchContext) -> str:
    """The note naming the table, its batch, device and dtype, and the budget."""
    table, budget = ctx.latency_table, ctx.latency_budget
    assert table is not None and budget is not None
    return (f"latency predicted by '{ctx.config.latency_table}' at batch {table.batch} on {table.device} "
            f"({table.dtype}); budget {format_latency(budget)}")


def budget_row(ctx: SearchContext, predicted_ms: float, seconds: float | None, **fields: Any) -> dict[str, Any]:
    """One latency.csv row: `fields` (name, GFLOPs, ...), predicted and measured milliseconds against the budget."""
    budget = ctx.latency_budget
    assert budget is not None
    return {**fields, "predicted_ms": predicted_ms, "measured_ms": None if seconds is None else 1e3 * seconds,
            "budget_ms": 1e3 * budget, "measured_over_budget": None if seconds is None else seconds / budget,
            "within_10pct_or_under": None if seconds is None else seconds <= 1.1 * budget}


def latency_rows(ctx: SearchContext, exported: list[dict[str, Any]], subnets: list[Subnet]) -> list[dict[str, Any]]:
    """Measure the exported subnets on the table's device; set their measured_latency_ms and return latency.csv's
    rows (predicted and measured against the budget)."""
    rows = []
    for e, seconds in zip(exported, measure_exported(ctx, subnets), strict=True):
        e["measured_latency_ms"] = None if seconds is None else 1e3 * seconds
        rows.append(budget_row(ctx, e["predicted_latency_ms"], seconds, name=e["name"], gflops=e["gflops"],
                               proxy_loss=e.get("proxy_loss")))
    return rows
