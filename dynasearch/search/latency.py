"""A latency budget for the static search: a second Optuna constraint on a latency table's prediction.

`dynasearch search --latency 40ms --latency-table FILE` (alone or with ``--flops``) loads the table
(:class:`dynasearch.cost.latency_table.LatencyTable`, measured by ``dynasearch bench latency-table``), checks that
it was measured for the supernet's architecture and covers every choice of the space, and adds the constraint
``latency = (predicted - budget) / budget`` to every trial (feasible: <= 0). The outputs add ``latency_ms``
(predicted, at the table's batch and device) to trials.csv, pareto.csv and baseline.csv, ``feasible`` requires
both budgets, best.json records the latency budget and each exported subnet's predicted and measured latency,
and ``latency.csv`` lists the exported subnets' predicted and measured latency against the budget.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
import pandas as pd
import torch

from ..cost.latency import measure_latency
from ..cost.latency_table import format_latency
from ..errors import SearchError
from ..fileio import atomic_write_text
from ..model.subnet import Subnet
from ..slicing import slice_subnet
from .context import SearchContext
from .outputs import (
    SearchResult,
    _pick_exports,
    baseline_frame,
    export_subnets,
    pareto_frame,
    search_settings,
    trials_frame,
)
from .trials import finished_count

__all__ = ["ATTR_LATENCY", "measure_exported", "set_latency_constraint", "write_latency_outputs"]

ATTR_LATENCY = "latency_s"
MEASURE_WARMUP, MEASURE_REPEATS = 2, 5


def set_latency_constraint(ctx: SearchContext, trial: optuna.Trial, subnet: Subnet) -> float:
    """Set the trial's `latency` constraint and its predicted latency; returns the prediction (seconds)."""
    assert ctx.latency_table is not None and ctx.latency_budget is not None
    predicted = ctx.latency_table.predict(subnet)
    trial.set_constraint("latency", (predicted - ctx.latency_budget) / ctx.latency_budget)
    trial.set_user_attr(ATTR_LATENCY, predicted)
    return predicted


def _with_latency(ctx: SearchContext, frame: pd.DataFrame) -> pd.DataFrame:
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
    table = ctx.latency_table
    assert table is not None
    if table.device == "cuda" and not torch.cuda.is_available():
        return [None] * len(subnets)
    device = torch.device(table.device)
    dtype = torch.bfloat16 if table.dtype == "bfloat16" else None
    threads, before = table.machine.get("threads"), torch.get_num_threads()
    out: list[float | None] = []
    try:
        if device.type == "cpu" and isinstance(threads, int) and threads > 0:
            torch.set_num_threads(threads)  # the thread count the table was measured with
        for subnet in subnets:
            small = slice_subnet(ctx.model, subnet).to(device)
            out.append(measure_latency(small, batch=table.batch, warmup=MEASURE_WARMUP, repeats=MEASURE_REPEATS,
                                       dtype=dtype))
            del small
    finally:
        torch.set_num_threads(before)
    return out


def _best(ctx: SearchContext, trials: pd.DataFrame) -> tuple[Subnet, dict[str, Any]]:
    """The best feasible trial (both budgets); the full model when it fits both."""
    full = Subnet.full(ctx.model.config)
    assert ctx.latency_table is not None and ctx.latency_budget is not None
    if ctx.budget >= ctx.full_flops and ctx.latency_table.predict(full) <= ctx.latency_budget:
        return full, {"trial": None, "gflops": ctx.full_flops / 1e9, "proxy_loss": ctx.evaluator(full),
                      "full_model": True}
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"]].dropna(subset=["proxy_loss"]) if not trials.empty else trials
    if ok.empty:
        raise SearchError("no trial finished within the budgets; run more --trials or raise --latency / --flops")
    row = ok.sort_values(["proxy_loss", "gflops", "number"]).iloc[0]
    return Subnet.from_dict(json.loads(row["subnet"])), {
        "trial": int(row["number"]), "gflops": float(row["gflops"]), "proxy_loss": float(row["proxy_loss"]),
        "full_model": False}


def _entries(ctx: SearchContext, best_subnet: Subnet, best: dict[str, Any], pareto: pd.DataFrame,
             best_uniform: dict[str, Any] | None) -> list[tuple[str, Subnet, dict[str, Any]]]:
    """What to export, as the FLOPs-only search does: best, spread Pareto points, the best uniform subnet."""
    table = ctx.latency_table
    assert table is not None

    def latency_info(subnet: Subnet) -> dict[str, float]:
        return {"predicted_latency_ms": 1e3 * table.predict(subnet)}

    entries = [("best", best_subnet, {"role": "best within budget", **best, **latency_info(best_subnet)})]
    for rank, idx in enumerate(_pick_exports(pareto, ctx.config.export_top), start=1):
        row = pareto.iloc[idx]
        subnet = Subnet.from_dict(json.loads(row["subnet"]))
        if subnet != best_subnet:
            entries.append((f"pareto-{rank:02d}", subnet, {"role": "pareto", "trial": int(row["number"]),
                                                           "proxy_loss": float(row["proxy_loss"]), **latency_info(subnet)}))
    if best_uniform is not None:
        subnet = Subnet.from_dict(json.loads(best_uniform["subnet"]))
        entries.append(("uniform", subnet, {
            "role": "best uniform within budget", "trial": None, "proxy_loss": float(best_uniform["proxy_loss"]),
            "rates": {k: float(best_uniform[k]) for k in ("attn_rate", "mlp_rate", "token_ratio")},
            **latency_info(subnet)}))
    return entries


def write_latency_outputs(ctx: SearchContext, study: optuna.Study) -> SearchResult:
    """The outputs of a latency-budgeted static search (those of a FLOPs-only search, plus latency)."""
    out, table, budget = ctx.config.out, ctx.latency_table, ctx.latency_budget
    assert table is not None and budget is not None
    trials = _with_latency(ctx, trials_frame(ctx, study))
    pareto = pareto_frame(trials)
    baseline = _with_latency(ctx, baseline_frame(ctx))
    best_subnet, best = _best(ctx, trials)
    notes = [(f"latency predicted by '{ctx.config.latency_table}' at batch {table.batch} on {table.device} "
              f"({table.dtype}); budget {format_latency(budget)}")]
    done = finished_count(study)
    if done < ctx.config.trials:
        notes.append(f"{done} of {ctx.config.trials} trials are finished (other workers are still running, or died): "
                     "rerun the same command to finish")
    uniform_ok = baseline[baseline["feasible"]]
    best_uniform = uniform_ok.sort_values("proxy_loss").iloc[0].to_dict() if not uniform_ok.empty else None
    entries = _entries(ctx, best_subnet, best, pareto, best_uniform)
    exported = export_subnets(ctx, entries)
    measured = measure_exported(ctx, [s for _, s, _ in entries])
    if measured and measured[0] is None:
        notes.append(f"the table's device ({table.device}) is not available here: exported subnets not measured")
    rows = []
    for e, seconds in zip(exported, measured):
        e["measured_latency_ms"] = None if seconds is None else 1e3 * seconds
        rows.append({"name": e["name"], "gflops": e["gflops"], "predicted_ms": e["predicted_latency_ms"],
                     "measured_ms": e["measured_latency_ms"], "budget_ms": 1e3 * budget,
                     "measured_over_budget": None if seconds is None else seconds / budget,
                     "within_10pct_or_under": None if seconds is None else seconds <= 1.1 * budget})
    latency = pd.DataFrame(rows)
    for frame, name in ((trials, "trials"), (pareto, "pareto"), (baseline, "baseline"), (latency, "latency")):
        atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
    best["predicted_latency_ms"] = 1e3 * table.predict(best_subnet)
    best["measured_latency_ms"] = exported[0]["measured_latency_ms"]
    summary = {
        **best,
        "subnet": best_subnet.to_dict(),
        "budget_gflops": ctx.budget / 1e9,
        "full_gflops": ctx.full_flops / 1e9,
        "latency_budget_ms": 1e3 * budget,
        "full_predicted_latency_ms": 1e3 * table.predict(),
        "best_uniform": best_uniform,
        "exported_latency": rows,
        "settings": {**search_settings(ctx), "workers": ctx.config.workers},
        "finished_trials": done,
        "crashed_trials": int((~trials["counted"] & (trials["state"] == "FAIL")).sum()) if not trials.empty else 0,
        "notes": notes,
    }
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2, default=float) + "\n")
    return SearchResult(out, trials, pareto, baseline, summary, exported, notes)
