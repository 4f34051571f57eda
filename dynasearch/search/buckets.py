"""The timestep-aware search split by bucket: each bucket's sampler steps, proxy quadruples, study and candidates.

The quality proxy is a mean over (image, timestep) quadruples, so it splits over timestep buckets: bucket k's
share is the mean loss of its quadruples times their fraction. Bucket k's study scores subnets on its quadruples
only, with no FLOPs limit (the knapsack applies the budget, :mod:`dynasearch.search.knapsack`); every uniform
subnet is scored too, once on the whole proxy set, and split by bucket.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import optuna
import pandas as pd

from ..cost.flops import mean_flops
from ..diffusion.factory import diffusion_for
from ..errors import SearchError
from ..model.schedule import SubnetSchedule, TimestepBuckets
from ..model.subnet import Subnet
from .config import SearchConfig
from .context import SearchContext, prepare_search
from .proxy import ProxyEvaluator

__all__ = ["TimestepContext", "bucket_candidates", "bucket_context", "prepare_timestep_search", "uniform_candidates"]


@dataclass
class TimestepContext:
    """A search context split by timestep bucket: the sampler's steps and the proxy quadruples of each bucket."""

    ctx: SearchContext
    buckets: TimestepBuckets
    timesteps: list[int]
    counts: list[int]  # sampler steps per bucket
    weights: list[float]  # share of the proxy quadruples per bucket
    evaluators: list[ProxyEvaluator]

    @property
    def budget_steps(self) -> int:
        """The budget as total FLOPs over the sampler's steps (mean budget x steps)."""
        return self.ctx.budget * len(self.timesteps)

    def mean_flops(self, schedule: SubnetSchedule) -> float:
        """Mean closed-form FLOPs per sampler step."""
        return mean_flops(schedule, self.ctx.model.config, self.timesteps)

    def mean_latency(self, schedule: SubnetSchedule) -> float | None:
        """Mean predicted seconds per sampler step (None without a latency table)."""
        table = self.ctx.latency_table
        return None if table is None else table.predict_schedule(schedule, self.timesteps)

    def within_budget(self, schedule: SubnetSchedule) -> bool:
        """Whether the schedule's mean FLOPs (and mean predicted latency) per step are within the budget(s)."""
        latency = self.mean_latency(schedule)
        return self.mean_flops(schedule) <= self.ctx.budget and (
            latency is None or latency <= (self.ctx.latency_budget or 0.0))

    def schedule(self, subnets: list[Subnet]) -> SubnetSchedule:
        """A schedule of these buckets."""
        return SubnetSchedule(self.buckets, tuple(subnets))


def prepare_timestep_search(config: SearchConfig) -> TimestepContext:
    """Prepare the static context, then split the sampler's steps and the proxy set by bucket (clear errors)."""
    settings = config.timestep
    settings.check()
    ctx = prepare_search(config)
    if not ctx.space.timestep_aware:
        raise SearchError(f"search space '{ctx.space.label}' has no timestep_buckets; use the static search")
    if config.workers > 1:
        raise SearchError(f"--workers {config.workers}: the timestep-aware search runs in one process "
                          "(use --workers 1)")
    diffusion = diffusion_for(ctx.model.config)
    if settings.sample_steps > diffusion.num_timesteps:
        raise SearchError(f"--sample-steps must be at most {diffusion.num_timesteps}, got {settings.sample_steps}")
    buckets = ctx.space.buckets(diffusion.num_timesteps)
    timesteps = diffusion.timestep_schedule(settings.sample_steps)
    counts = buckets.step_counts(timesteps)
    empty = [k for k, n in enumerate(counts) if n == 0]
    if empty:
        raise SearchError(
            f"--sample-steps {settings.sample_steps} leaves timestep bucket {empty[0]} ({buckets.label(empty[0])}) "
            "without a sampling step; use more steps or fewer buckets"
        )
    bucket = buckets.bucket_index(ctx.evaluator.proxy.t)  # (num,)
    evaluators, weights = [], []
    for k in range(len(buckets)):
        index = (bucket == k).nonzero().flatten()
        if len(index) == 0:
            raise SearchError(f"--proxy-samples {config.proxy_samples} leaves timestep bucket {k} with no sample")
        evaluators.append(ctx.evaluator.restricted(index))
        weights.append(len(index) / len(bucket))
    ctx.settings.update({"sample_steps": settings.sample_steps, "timestep_boundaries": list(buckets.boundaries)})
    return TimestepContext(ctx, buckets, timesteps, counts, weights, evaluators)


def bucket_context(tc: TimestepContext, k: int) -> SearchContext:
    """The static search context of bucket k: its quadruples only, no FLOPs or latency limit (the knapsack applies
    them)."""
    ctx = tc.ctx
    lo, hi = tc.buckets.boundaries[k], tc.buckets.boundaries[k + 1]
    settings = {**ctx.settings, "bucket": k, "timestep_range": [lo, hi], "budget_flops": ctx.full_flops}
    config = replace(ctx.config, study_name=f"{ctx.config.study_name}-t{k}")
    return replace(ctx, config=config, evaluator=tc.evaluators[k], budget=ctx.full_flops, settings=settings,
                   latency_table=None, latency_budget=None)


def uniform_candidates(tc: TimestepContext) -> pd.DataFrame:
    """Every distinct uniform subnet, scored once on the whole proxy set and split by bucket."""
    ctx, cfg = tc.ctx, tc.ctx.model.config
    bucket = tc.buckets.bucket_index(ctx.evaluator.proxy.t).cpu()
    rows = []
    for _, subnet in ctx.space.uniform_subnets(cfg):
        per_sample = ctx.evaluator.per_sample(subnet)  # (num,)
        for k in range(len(tc.buckets)):
            rows.append(_row(tc, k, "uniform", None, ctx.flops(subnet), float(per_sample[bucket == k].mean()), subnet))
    return pd.DataFrame(rows)


def _row(
    tc: TimestepContext, k: int, source: str, trial: int | None, flops: int, loss: float, subnet: Subnet
) -> dict[str, Any]:
    """One candidate row of bucket_trials.csv (with its predicted latency when the search has a latency budget)."""
    row: dict[str, Any] = {
        "bucket": k, "timesteps": tc.buckets.label(k), "source": source, "trial": trial, "gflops": flops / 1e9,
        "flops": flops, "proxy_loss": loss, "subnet": json.dumps(subnet.to_dict()),
    }
    if tc.ctx.latency_table is not None:
        row["latency_s"] = tc.ctx.latency_table.predict(subnet)
    return row


def bucket_candidates(tc: TimestepContext, k: int, study: optuna.Study) -> list[dict[str, Any]]:
    """Completed, finite trials of bucket k's study."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.values and math.isfinite(t.values[0]) and "subnet" in t.user_attrs:
            subnet = Subnet.from_dict(t.user_attrs["subnet"])
            rows.append(_row(tc, k, "trial", t.number, int(t.user_attrs["flops"]), float(t.values[0]), subnet))
    return rows
