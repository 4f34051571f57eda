"""The latency budget of a search: the table and the budget of `--latency` / `--latency-table`, checked.

Read by :func:`dynasearch.search.context.prepare_search`; the constraint and the outputs are in
:mod:`dynasearch.search.latency`.
"""

from __future__ import annotations

from typing import Any

from ..cost.latency_table import (
    LatencyTable,
    LatencyTableError,
    format_latency,
    parse_latency,
)
from ..errors import BudgetError, SearchError
from ..model.config import DiTConfig
from ..space import SearchSpace
from .config import SearchConfig

__all__ = ["latency_settings", "load_latency_budget"]


def load_latency_budget(config: SearchConfig, model: DiTConfig, space: SearchSpace) -> tuple[LatencyTable, float]:
    """The table and the budget (seconds) of a search with --latency, every input checked with a one-line error."""
    assert config.latency is not None and config.latency_table is not None
    budget = parse_latency(config.latency)
    try:
        table = LatencyTable.load(config.latency_table)
        table.check_model(model, f"latency table '{config.latency_table}'")
        table.check_covers([s for _, s in space.uniform_subnets(model)], f"latency table '{config.latency_table}'")
    except LatencyTableError as exc:
        raise SearchError(str(exc)) from None
    smallest = table.predict(space.smallest(model))
    if budget < smallest:
        raise BudgetError(
            f"latency budget '{config.latency}' ({format_latency(budget)}) is below the predicted latency of the "
            f"smallest subnet of space '{space.name}', {format_latency(smallest)} (batch {table.batch}, "
            f"{table.device}, {table.dtype})"
        )
    return table, budget


def latency_settings(config: SearchConfig, table: LatencyTable, budget: float) -> dict[str, Any]:
    """What a study records of its latency budget (a resumed study must have the same)."""
    return {"latency_budget_s": budget, "latency": config.latency, "latency_table": str(config.latency_table),
            "latency_table_batch": table.batch, "latency_table_device": table.device,
            "latency_table_dtype": table.dtype}
