"""Timestep-aware search: a subnet per timestep bucket, under a budget on the mean FLOPs per denoising step.

The quality proxy is a mean over (image, timestep) quadruples, so it splits over timestep buckets: bucket k's
share is the mean loss of its quadruples times their fraction. Two searches run on the same supernet and proxy:

* **per bucket + knapsack**: one Optuna study per bucket scores subnets on that bucket's quadruples only (so K
  studies of N trials cost about as much as one static search of N trials); every uniform subnet is scored too.
  An exact multiple-choice knapsack then takes one point per bucket: cost = FLOPs x sampler steps in the bucket,
  value = bucket loss x bucket share, total cost <= budget x steps.
* **joint**: one Optuna study over every bucket's choices at once, the budget as a constraint on the mean.

Both are compared with the best static subnet (the best uniform subnet within the budget, and a reference subnet
such as a static search's best if given); the better schedule is written as ``schedule.json`` and exported.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd

from ..checkpoint.native import read_config, save_checkpoint
from ..cost.flops import bucket_flops, count_flops, mean_flops
from ..errors import SearchError
from ..fileio import atomic_write_text
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule, TimestepBuckets, load_subnet_or_schedule
from ..model.subnet import Subnet
from ..search_space import SearchSpace, load_space
from ..slicing import slice_schedule
from .knapsack import multiple_choice_knapsack
from .proxy import ProxyEvaluator
from .storage import mask_url
from .study import (
    SearchConfig,
    SearchContext,
    SearchInterrupted,
    check_study,
    finished_count,
    prepare_search,
    run_trials,
    subnet_params,
)
from .workers import graceful_sigint

__all__ = [
    "TimestepSettings", "TimestepContext", "TimestepSearchResult", "run_timestep_search", "export_schedule",
    "is_timestep_search",
]

_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


@dataclass(frozen=True)
class TimestepSettings:
    """What a timestep-aware search adds to a SearchConfig: the sampler run its FLOPs are averaged over."""

    sample_steps: int = 50
    reference: Path | None = None  # a static subnet (or a static search's best.json) to compare against

    def __post_init__(self) -> None:
        if isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise SearchError(f"--sample-steps must be a positive integer, got {self.sample_steps!r}")


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

    def schedule(self, subnets: list[Subnet]) -> SubnetSchedule:
        """A schedule of these buckets."""
        return SubnetSchedule(self.buckets, tuple(subnets))


def is_timestep_search(config: SearchConfig) -> bool:
    """True when the search space (given, or the supernet's training space) has timestep buckets."""
    if config.space is not None:
        return load_space(config.space).timestep_aware
    doc = read_config(config.supernet)
    space = doc.get("space")
    return bool(space) and SearchSpace.from_dict(space, source=f"{config.supernet}/config.json").timestep_aware


def prepare_timestep_search(config: SearchConfig, settings: TimestepSettings) -> TimestepContext:
    """Prepare the static context, then split the sampler's steps and the proxy set by bucket (clear errors)."""
    from ..diffusion.factory import diffusion_for

    ctx = prepare_search(config)
    if not ctx.space.timestep_aware:
        raise SearchError(f"search space '{ctx.space.label}' has no timestep_buckets; use the static search")
    if config.workers > 1:
        raise SearchError(f"--workers {config.workers}: the timestep-aware search runs in one process (use --workers 1)")
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


# ---------------------------------------------------------------------------------------------------- per bucket
def _bucket_context(tc: TimestepContext, k: int) -> SearchContext:
    """The static search context of bucket k: its quadruples only, no FLOPs limit (the knapsack applies it)."""
    ctx = tc.ctx
    lo, hi = tc.buckets.boundaries[k], tc.buckets.boundaries[k + 1]
    settings = {**ctx.settings, "bucket": k, "timestep_range": [lo, hi], "budget_flops": ctx.full_flops}
    config = replace(ctx.config, study_name=f"{ctx.config.study_name}-t{k}")
    return replace(ctx, config=config, evaluator=tc.evaluators[k], budget=ctx.full_flops, settings=settings)


def _uniform_candidates(tc: TimestepContext) -> pd.DataFrame:
    """Every distinct uniform subnet, scored once on the whole proxy set and split by bucket."""
    ctx, cfg = tc.ctx, tc.ctx.model.config
    bucket = tc.buckets.bucket_index(ctx.evaluator.proxy.t).cpu()
    rows = []
    for _, subnet in ctx.space.uniform_subnets(cfg):
        per_sample = ctx.evaluator.per_sample(subnet)  # (num,)
        for k in range(len(tc.buckets)):
            rows.append(_row(tc, k, "uniform", None, ctx.flops(subnet), float(per_sample[bucket == k].mean()), subnet))
    return pd.DataFrame(rows)


def _row(tc: TimestepContext, k: int, source: str, trial: int | None, flops: int, loss: float, subnet: Subnet) -> dict[str, Any]:
    """One candidate row of bucket_trials.csv."""
    return {
        "bucket": k, "timesteps": tc.buckets.label(k), "source": source, "trial": trial, "gflops": flops / 1e9,
        "flops": flops, "proxy_loss": loss, "subnet": json.dumps(subnet.to_dict()),
    }


def _trial_candidates(tc: TimestepContext, k: int, study: optuna.Study) -> list[dict[str, Any]]:
    """Completed, finite trials of bucket k's study."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.values and math.isfinite(t.values[0]) and "subnet" in t.user_attrs:
            subnet = Subnet.from_dict(t.user_attrs["subnet"])
            rows.append(_row(tc, k, "trial", t.number, int(t.user_attrs["flops"]), float(t.values[0]), subnet))
    return rows


def _mark_fronts(candidates: pd.DataFrame) -> pd.DataFrame:
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


# ---------------------------------------------------------------------------------------------------- joint
def _joint_context(tc: TimestepContext) -> SearchContext:
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


def _joint_evaluate(tc: TimestepContext) -> Callable[[SearchContext, optuna.Trial], tuple[tuple[float, float], str]]:
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
        trial.set_user_attr("schedule", schedule.to_dict())
        loss = sum(w * ev(sub) for w, ev, sub in zip(tc.weights, tc.evaluators, subnets))
        return (loss, mean / 1e9), "" if math.isfinite(loss) else f"proxy loss is {loss}"

    return evaluate


def _seed_joint(tc: TimestepContext) -> Callable[[SearchContext, optuna.Study], None]:
    """Enqueue the largest and the smallest static subnets in every bucket (only into a new study)."""

    def seed(ctx: SearchContext, study: optuna.Study) -> None:
        if study.get_trials(deepcopy=False):
            return
        s, n = ctx.space, len(ctx.groups)
        for attn, mlp, tok in ((s.attn_rate[-1], s.mlp_rate[-1], s.token_ratio[-1]), (s.attn_rate[0], s.mlp_rate[0], s.token_ratio[0])):
            study.enqueue_trial(_joint_params(tc, ([attn] * n, [mlp] * n, [tok] * n)), skip_if_exists=True)

    return seed


def run_joint(
    tc: TimestepContext, on_trial: Callable[[int], None] | None = None, stop: threading.Event | None = None
) -> optuna.Study:
    """Run (or resume) the joint study up to `trials` counted trials; `stop` (Ctrl-C) ends it after the running one.

    Crashed trials are failed and retried as in the static search (:func:`dynasearch.search.run_trials`).
    """
    return run_trials(_joint_context(tc), on_trial=on_trial, stop=stop, evaluate=_joint_evaluate(tc), seed=_seed_joint(tc))


def _joint_frame(study: optuna.Study, budget: int) -> pd.DataFrame:
    """One row per finished joint trial."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=_FINISHED):
        mean = t.user_attrs.get("mean_flops")
        rows.append({
            "trial": t.number, "state": t.state.name, "mean_gflops": mean / 1e9 if mean is not None else None,
            "proxy_loss": t.values[0] if t.values else None, "feasible": mean is not None and mean <= budget,
            "schedule": json.dumps(t.user_attrs.get("schedule")),
        })
    return pd.DataFrame(rows, columns=["trial", "state", "mean_gflops", "proxy_loss", "feasible", "schedule"])


# ---------------------------------------------------------------------------------------------------- outputs
@dataclass
class TimestepSearchResult:
    """The comparison table, the winning schedule and the files written."""

    out: Path
    comparison: pd.DataFrame
    best: dict[str, Any]
    schedule: SubnetSchedule
    exported: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_schedule(model: DiT, schedule: SubnetSchedule, directory: Path, timesteps: list[int], info: dict[str, Any]) -> dict[str, Any]:
    """Write a timestep-dynamic checkpoint: weights sliced to the schedule's union plus every bucket's subnet.

    FLOPs of every bucket are re-counted with fvcore on the sliced model and must equal the closed form.
    """
    small = slice_schedule(model, schedule)
    per_bucket = []
    for k, subnet in enumerate(schedule.subnets):
        counted = count_flops(small, subnet).total
        expected = bucket_flops(schedule, model.config)[k]
        if counted != expected:
            raise SearchError(f"schedule bucket {k}: fvcore counts {counted} FLOPs but the search counted {expected}")
        per_bucket.append(counted)
    mean = mean_flops(schedule, small.config, timesteps)
    meta = {**info, "mean_flops": mean, "mean_gflops": mean / 1e9, "bucket_flops": per_bucket, "sample_steps": len(timesteps)}
    save_checkpoint(small, directory, extra={"kind": "timestep-dynamic", "schedule": schedule.to_dict(), "search": meta})
    schedule.save(directory / "schedule.json")
    params = sum(p.numel() for p in small.parameters())
    return {"path": str(directory), "mean_gflops": mean / 1e9, "params": params, **info}


def _comparison_row(tc: TimestepContext, method: str, schedule: SubnetSchedule) -> dict[str, Any]:
    """Mean FLOPs, proxy loss (re-scored on the whole proxy set) and per-bucket figures of one schedule."""
    mean = tc.mean_flops(schedule)
    losses = tc.ctx.evaluator.schedule_losses(schedule)
    row: dict[str, Any] = {
        "method": method, "mean_gflops": mean / 1e9, "flops_ratio": mean / tc.ctx.full_flops,
        "within_budget": mean <= tc.ctx.budget, "proxy_loss": sum(w * v for w, v in zip(tc.weights, losses)),
        "static": schedule.is_static,
    }
    flops = bucket_flops(schedule, tc.ctx.model.config)
    for k in range(len(tc.buckets)):
        row[f"loss_t{k}"] = losses[k]
        row[f"gflops_t{k}"] = flops[k] / 1e9
    row["schedule"] = json.dumps(schedule.to_dict())
    return row


def _best_uniform(tc: TimestepContext, uniform: pd.DataFrame) -> Subnet | None:
    """The uniform subnet with the lowest whole-proxy loss within the budget."""
    if uniform.empty:
        return None
    weights = pd.Series(tc.weights, index=range(len(tc.weights)))
    total = (uniform["proxy_loss"] * uniform["bucket"].map(weights)).groupby(uniform["subnet"]).sum()
    flops = uniform.groupby("subnet")["flops"].first()
    ok = total[flops <= tc.ctx.budget]
    return Subnet.from_dict(json.loads(ok.idxmin())) if not ok.empty else None


def _run_studies(tc: TimestepContext, progress: bool) -> tuple[list[dict[str, Any]], optuna.Study]:
    """Run (or resume) every bucket's study, then the joint study; Ctrl-C stops after the running trial.

    Returns the bucket studies' candidates and the joint study; raises SearchInterrupted when stopped.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    trials, k_buckets = tc.ctx.config.trials, len(tc.buckets)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    candidates: list[dict[str, Any]] = []
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = graceful_sigint(stop) if in_main else None
    finished, target = 0, trials * (k_buckets + 1)
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("bucket studies", total=trials * k_buckets)
            for k in range(k_buckets):
                done = k * trials
                study = run_trials(_bucket_context(tc, k), stop=stop,
                                   on_trial=lambda n, d=done: bar.update(task, completed=d + min(n, trials)))
                finished += min(finished_count(study), trials)
                if stop.is_set():
                    raise SearchInterrupted(finished, target)
                candidates.extend(_trial_candidates(tc, k, study))
            joint_task = bar.add_task("joint study", total=trials)
            joint = run_joint(tc, on_trial=lambda n: bar.update(joint_task, completed=min(n, trials)), stop=stop)
            joint_done = finished_count(joint)
            bar.update(joint_task, completed=min(joint_done, trials))
            if stop.is_set() and joint_done < trials:
                raise SearchInterrupted(finished + joint_done, target)
    except KeyboardInterrupt as exc:  # a second Ctrl-C: the running trial is failed and retried on resume
        if isinstance(exc, SearchInterrupted):
            raise
        raise SearchInterrupted(finished, target) from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return candidates, joint


def _compare(
    tc: TimestepContext, knapsack: SubnetSchedule, joint: pd.DataFrame, uniform: pd.DataFrame, reference: Subnet | None
) -> tuple[pd.DataFrame, list[str]]:
    """The comparison table (knapsack, joint, best uniform, reference), with the winning schedule marked."""
    rows = [_comparison_row(tc, "knapsack", knapsack)]
    notes = []
    feasible = joint[(joint["state"] == "COMPLETE") & joint["feasible"]].dropna(subset=["proxy_loss"])
    if feasible.empty:
        notes.append("no joint trial finished within the budget; run more --trials")
    else:
        best_joint = feasible.sort_values(["proxy_loss", "mean_gflops", "trial"]).iloc[0]
        rows.append(_comparison_row(tc, "joint", SubnetSchedule.from_dict(json.loads(best_joint["schedule"]))))
    static_uniform = _best_uniform(tc, uniform)
    if static_uniform is not None:
        rows.append(_comparison_row(tc, "static uniform", SubnetSchedule.static(static_uniform, tc.buckets)))
    if reference is not None:
        rows.append(_comparison_row(tc, "static reference", SubnetSchedule.static(reference, tc.buckets)))
    comparison = pd.DataFrame(rows)
    dynamic = comparison[comparison["method"].isin(["knapsack", "joint"]) & comparison["within_budget"]]
    winner = dynamic.sort_values(["proxy_loss", "mean_gflops"]).iloc[0]
    comparison["winner"] = comparison["method"] == winner["method"]
    return comparison, notes


def run_timestep_search(config: SearchConfig, settings: TimestepSettings, progress: bool = True) -> TimestepSearchResult:
    """Per-bucket studies + knapsack and a joint study (both resumable), compared with the best static subnets."""
    tc = prepare_timestep_search(config, settings)  # every input is checked before anything is written
    ctx, cfg = tc.ctx, tc.ctx.model.config
    reference = None
    if settings.reference is not None:
        reference = load_subnet_or_schedule(settings.reference)
        if not isinstance(reference, Subnet):
            raise SearchError(f"--reference '{settings.reference}' is a schedule; give a static subnet")
        reference.validate(cfg)
    for study_ctx in [*(_bucket_context(tc, k) for k in range(len(tc.buckets))), _joint_context(tc)]:
        check_study(study_ctx)  # the storage opens and existing studies have the same settings
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"output directory '{config.out}' cannot be created: {exc.strerror}") from None
    candidates, joint = _run_studies(tc, progress)
    uniform = _uniform_candidates(tc)
    table = _mark_fronts(pd.concat([pd.DataFrame(candidates), uniform], ignore_index=True))
    knapsack, predicted = knapsack_schedule(tc, table)
    joint_frame = _joint_frame(joint, ctx.budget)
    comparison, notes = _compare(tc, knapsack, joint_frame, uniform, reference)
    rescored = float(comparison.iloc[0]["proxy_loss"])
    if abs(predicted - rescored) > 1e-4 * max(1.0, abs(predicted)):
        notes.append(f"knapsack predicted proxy {predicted:.6f} but re-scoring gave {rescored:.6f}")
    winner = comparison[comparison["winner"]].iloc[0]
    schedule = SubnetSchedule.from_dict(json.loads(winner["schedule"]))
    exported = []
    for _, row in comparison.iterrows():
        name = row["method"].replace(" ", "-")
        info = {"role": "winner" if row["winner"] else row["method"], "method": row["method"], "proxy_loss": float(row["proxy_loss"]),
                "source_supernet": str(config.supernet)}
        sched = SubnetSchedule.from_dict(json.loads(row["schedule"]))
        exported.append({"name": name, **export_schedule(ctx.model, sched, config.out / "schedules" / name, tc.timesteps, info)})
    atomic_write_text(config.out / "bucket_trials.csv", table.to_csv(index=False))
    atomic_write_text(config.out / "joint_trials.csv", joint_frame.to_csv(index=False))
    atomic_write_text(config.out / "schedules.csv", comparison.to_csv(index=False))
    schedule.save(config.out / "schedule.json")
    best = {
        "method": winner["method"], "mean_gflops": float(winner["mean_gflops"]), "flops_ratio": float(winner["flops_ratio"]),
        "proxy_loss": float(winner["proxy_loss"]), "schedule": schedule.to_dict(),
        "budget_gflops": ctx.budget / 1e9, "full_gflops": ctx.full_flops / 1e9, "knapsack_predicted_proxy": predicted,
        "model_config": cfg.to_dict(),
        "sample_steps": settings.sample_steps, "steps_per_bucket": tc.counts, "proxy_share_per_bucket": tc.weights,
        "comparison": json.loads(comparison.drop(columns=["schedule"]).to_json(orient="records")),
        "settings": {**ctx.settings, "sampler": config.sampler, "trials": config.trials, "seed": config.seed,
                     "study_name": config.study_name, "storage": mask_url(config.storage or str(config.out / "study.journal"))},
        "notes": notes,
    }
    atomic_write_text(config.out / "best.json", json.dumps(best, indent=2, default=float) + "\n")
    return TimestepSearchResult(config.out, comparison, best, schedule, exported, notes)
