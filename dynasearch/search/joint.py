"""The joint study of the timestep-aware search: every bucket's choices at once, the budget on the mean FLOPs.

One Optuna study suggests a subnet for every bucket; a trial scores the schedule's proxy loss (each bucket's loss
on its quadruples, weighted by its share) and its mean GFLOPs per sampler step, the budget as a constraint.
It is seeded with the largest and the smallest static subnets, and crashed trials are retried as in the static
search (:func:`dynasearch.search.objective.run_trials`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import replace

import optuna
import pandas as pd

from .buckets import TimestepContext
from .context import SearchContext, subnet_params
from .objective import Evaluate, run_trials
from .trials import FINISHED

__all__ = ["joint_context", "joint_frame", "run_joint"]


def joint_context(tc: TimestepContext) -> SearchContext:
    """The search context of the joint study (its own study name, same settings)."""
    ctx = tc.ctx
    config = replace(ctx.config, study_name=f"{ctx.config.study_name}-joint")
    return replace(ctx, config=config, settings={**ctx.settings, "joint": True})


def _joint_params(tc: TimestepContext, subnet_rates: tuple[list[float], list[float], list[float]]) -> dict[str, float]:
    """Parameters of the joint study for the same static rates in every bucket."""
    n = len(tc.ctx.groups)
    params: dict[str, float] = {}
    for k in range(len(tc.buckets)):
        params.update({f"t{k}_{name}": v for name, v in subnet_params(n, *subnet_rates).items()})
    return params


def _joint_evaluate(tc: TimestepContext) -> Evaluate:
    """Suggest every bucket's subnet; score the schedule's proxy loss and mean GFLOPs (budget: a constraint)."""
    s = tc.ctx.space
    n = len(tc.ctx.groups)

    def evaluate(ctx: SearchContext, trial: optuna.Trial) -> tuple[tuple[float, float], str]:
        subnets = []
        for k in range(len(tc.buckets)):
            params = {
                f"{dim}_{g}": trial.suggest_categorical(f"t{k}_{dim}_{g}", choices)
                for g in range(n)
                for dim, choices in (("attn", s.attn_rate), ("mlp", s.mlp_rate), ("tok", s.token_ratio))
            }
            subnets.append(ctx.subnet_from_params(params))
        schedule = tc.schedule(subnets)
        mean = tc.mean_flops(schedule)
        trial.set_constraint("flops", (mean - ctx.budget) / ctx.budget)
        trial.set_user_attr("mean_flops", mean)
        latency = tc.mean_latency(schedule)
        if latency is not None and ctx.latency_budget is not None:  # a second constraint: mean predicted latency
            trial.set_constraint("latency", (latency - ctx.latency_budget) / ctx.latency_budget)
            trial.set_user_attr("mean_latency_s", latency)
        trial.set_user_attr("schedule", schedule.to_dict())
        loss = sum(w * ev(sub) for w, ev, sub in zip(tc.weights, tc.evaluators, subnets, strict=True))
        return (loss, mean / 1e9), "" if math.isfinite(loss) else f"proxy loss is {loss}"

    return evaluate


def _seed_joint(tc: TimestepContext) -> Callable[[SearchContext, optuna.Study], None]:
    """Enqueue the largest and the smallest static subnets in every bucket (only into a new study)."""

    def seed(ctx: SearchContext, study: optuna.Study) -> None:
        if study.get_trials(deepcopy=False):
            return
        s, n = ctx.space, len(ctx.groups)
        for attn, mlp, tok in ((s.attn_rate[-1], s.mlp_rate[-1], s.token_ratio[-1]),
                               (s.attn_rate[0], s.mlp_rate[0], s.token_ratio[0])):
            study.enqueue_trial(_joint_params(tc, ([attn] * n, [mlp] * n, [tok] * n)), skip_if_exists=True)

    return seed


def run_joint(
    tc: TimestepContext, on_trial: Callable[[int], None] | None = None, stop: threading.Event | None = None
) -> optuna.Study:
    """Run (or resume) the joint study up to `trials` counted trials; `stop` (Ctrl-C) ends it after the running one.

    Crashed trials are failed and retried as in the static search (:func:`dynasearch.search.objective.run_trials`).
    """
    return run_trials(joint_context(tc), on_trial=on_trial, stop=stop, evaluate=_joint_evaluate(tc),
                      seed=_seed_joint(tc))


def joint_frame(study: optuna.Study, budget: int, latency_budget: float | None = None) -> pd.DataFrame:
    """One row per finished joint trial (with a latency budget: its mean predicted latency, and feasibility under
    both budgets)."""
    rows = []
    columns = ["trial", "state", "mean_gflops", "proxy_loss", "feasible", "schedule"]
    if latency_budget is not None:
        columns.insert(3, "mean_latency_ms")
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        mean = t.user_attrs.get("mean_flops")
        row = {
            "trial": t.number, "state": t.state.name, "mean_gflops": mean / 1e9 if mean is not None else None,
            "proxy_loss": t.values[0] if t.values else None, "feasible": mean is not None and mean <= budget,
            "schedule": json.dumps(t.user_attrs.get("schedule")),
        }
        if latency_budget is not None:
            latency = t.user_attrs.get("mean_latency_s")
            row["mean_latency_ms"] = None if latency is None else 1e3 * latency
            row["feasible"] = row["feasible"] and latency is not None and latency <= latency_budget
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
