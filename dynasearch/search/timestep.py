"""Timestep-aware search: a subnet per timestep bucket, under a budget on the mean FLOPs (and/or the mean predicted
latency, with ``--latency``) per denoising step.

The quality proxy is a mean over (image, timestep) quadruples, so it splits over timestep buckets. Two searches
run on the same supernet and proxy:

* **per bucket + knapsack** (:mod:`dynasearch.search.buckets`, :mod:`dynasearch.search.knapsack`): one Optuna
  study per bucket scores subnets on that bucket's quadruples only (so K studies of N trials cost about as much
  as one static search of N trials); every uniform subnet is scored too. An exact multiple-choice knapsack then
  takes one point per bucket within the budget.
* **joint** (:mod:`dynasearch.search.joint`): one Optuna study over every bucket's choices at once, the budget
  as a constraint on the mean.

Both are compared here with the best static subnet (the best uniform subnet within the budget, and a reference
subnet such as a static search's best if given); the better schedule is written as ``schedule.json`` and every
compared schedule is exported as a timestep-dynamic checkpoint.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from ..checkpoint.native import inherited_sections, save_checkpoint
from ..cost.flops import bucket_flops, count_flops, mean_flops
from ..errors import SearchError
from ..fileio import atomic_write_text
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule, load_subnet_or_schedule
from ..model.subnet import Subnet
from ..progress_bar import progress_bar
from ..slicing import slice_schedule
from .buckets import TimestepContext, bucket_candidates, bucket_context, prepare_timestep_search, uniform_candidates
from .config import SearchConfig
from .joint import joint_context, joint_frame, run_joint
from .knapsack import knapsack_schedule, mark_fronts
from .latency import budget_row, latency_note, measure_schedules, predicted_ms
from .objective import run_trials
from .outputs import search_settings
from .study import check_study
from .trials import SearchInterrupted, finished_count
from .workers import graceful_sigint

__all__ = ["TimestepSearchResult", "export_schedule", "run_timestep_search"]


@dataclass
class TimestepSearchResult:
    """The comparison table, the winning schedule and the files written."""

    out: Path
    comparison: pd.DataFrame
    best: dict[str, Any]
    schedule: SubnetSchedule
    exported: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_schedule(model: DiT, schedule: SubnetSchedule, directory: Path, timesteps: list[int], info: dict[str, Any],
                    supernet: str | Path | None = None) -> dict[str, Any]:
    """Write a timestep-dynamic checkpoint: weights sliced to the schedule's union plus every bucket's subnet (and the
    `supernet` checkpoint's inherited sections, e.g. its data record).

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
    meta = {**info, "mean_flops": mean, "mean_gflops": mean / 1e9, "bucket_flops": per_bucket,
            "sample_steps": len(timesteps)}
    inherited = inherited_sections(supernet) if supernet is not None else {}
    save_checkpoint(small, directory,
                    extra={"kind": "timestep-dynamic", "schedule": schedule.to_dict(), "search": meta, **inherited})
    schedule.save(directory / "schedule.json")
    params = sum(p.numel() for p in small.parameters())
    return {"path": str(directory), "mean_gflops": mean / 1e9, "params": params, **info}


def _comparison_row(tc: TimestepContext, method: str, schedule: SubnetSchedule) -> dict[str, Any]:
    """Mean FLOPs, proxy loss (re-scored on the whole proxy set) and per-bucket figures of one schedule."""
    mean = tc.mean_flops(schedule)
    losses = tc.ctx.evaluator.schedule_losses(schedule)
    row: dict[str, Any] = {
        "method": method, "mean_gflops": mean / 1e9, "flops_ratio": mean / tc.ctx.full_flops,
        "within_budget": tc.within_budget(schedule),
        "proxy_loss": sum(w * v for w, v in zip(tc.weights, losses, strict=True)),
        "static": schedule.is_static,
    }
    latency = tc.mean_latency(schedule)
    if latency is not None:  # predicted mean per sampler step; the measured one is added after export
        row["mean_latency_ms"] = 1e3 * latency
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
    fits = flops <= tc.ctx.budget
    if tc.ctx.latency_budget is not None:
        fits &= uniform.groupby("subnet")["latency_s"].first() <= tc.ctx.latency_budget
    ok = total[fits]
    return Subnet.from_dict(json.loads(ok.idxmin())) if not ok.empty else None


def _run_studies(tc: TimestepContext, progress: bool) -> tuple[list[dict[str, Any]], optuna.Study]:
    """Run (or resume) every bucket's study, then the joint study; Ctrl-C stops after the running trial.

    Returns the bucket studies' candidates and the joint study; raises SearchInterrupted when stopped.
    """
    trials, k_buckets = tc.ctx.config.trials, len(tc.buckets)
    candidates: list[dict[str, Any]] = []
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = graceful_sigint(stop) if in_main else None
    finished, target = 0, trials * (k_buckets + 1)
    try:
        with progress_bar("[bold]{task.description}", disable=not progress, transient=False) as bar:
            task = bar.add_task("bucket studies", total=trials * k_buckets)
            for k in range(k_buckets):
                done = k * trials
                study = run_trials(bucket_context(tc, k), stop=stop,
                                   on_trial=lambda n, d=done: bar.update(task, completed=d + min(n, trials)))
                finished += min(finished_count(study), trials)
                if stop.is_set():
                    raise SearchInterrupted(finished, target)
                candidates.extend(bucket_candidates(tc, k, study))
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
    if tc.ctx.latency_table is not None:
        notes.append(latency_note(tc.ctx) + " (mean per sampler step)")
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


def _schedule_latency(tc: TimestepContext, comparison: pd.DataFrame, exported: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure every exported schedule's mean latency per step; add measured_latency_ms to the comparison and
    the exports, write latency.csv, and return best.json's latency fields."""
    ctx = tc.ctx
    assert ctx.latency_budget is not None
    schedules = [SubnetSchedule.from_dict(json.loads(s)) for s in comparison["schedule"]]
    measured = measure_schedules(ctx, schedules, tc.timesteps)
    comparison["measured_latency_ms"] = [None if m is None else 1e3 * m for m in measured]
    rows = []
    for e, (_, row), seconds in zip(exported, comparison.iterrows(), measured, strict=True):
        e["predicted_latency_ms"], e["measured_latency_ms"] = row["mean_latency_ms"], row["measured_latency_ms"]
        rows.append(budget_row(ctx, row["mean_latency_ms"], seconds, name=e["name"], mean_gflops=row["mean_gflops"]))
    atomic_write_text(ctx.config.out / "latency.csv", pd.DataFrame(rows).to_csv(index=False))
    return {"latency_budget_ms": 1e3 * ctx.latency_budget, "full_predicted_latency_ms": predicted_ms(ctx),
            "exported_latency": rows}


def run_timestep_search(config: SearchConfig, progress: bool = True) -> TimestepSearchResult:
    """Per-bucket studies + knapsack and a joint study (both resumable), compared with the best static subnets.

    `config.timestep` holds the sampler steps and the reference subnet; Ctrl-C raises :class:`SearchInterrupted`
    with the outputs untouched (a rerun resumes every study).
    """
    tc = prepare_timestep_search(config)  # every input is checked before anything is written
    settings = config.timestep
    ctx, cfg = tc.ctx, tc.ctx.model.config
    reference = None
    if settings.reference is not None:
        reference = load_subnet_or_schedule(settings.reference)
        if not isinstance(reference, Subnet):
            raise SearchError(f"--reference '{settings.reference}' is a schedule; give a static subnet")
        reference.validate(cfg)
    for study_ctx in [*(bucket_context(tc, k) for k in range(len(tc.buckets))), joint_context(tc)]:
        check_study(study_ctx)  # the storage opens and existing studies have the same settings
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"output directory '{config.out}' cannot be created: {exc.strerror}") from None
    candidates, joint = _run_studies(tc, progress)
    uniform = uniform_candidates(tc)
    table = mark_fronts(pd.concat([pd.DataFrame(candidates), uniform], ignore_index=True))
    knapsack, predicted = knapsack_schedule(tc, table)
    trials_of_joint = joint_frame(joint, ctx.budget, ctx.latency_budget)
    comparison, notes = _compare(tc, knapsack, trials_of_joint, uniform, reference)
    rescored = float(comparison.iloc[0]["proxy_loss"])
    if abs(predicted - rescored) > 1e-4 * max(1.0, abs(predicted)):
        notes.append(f"knapsack predicted proxy {predicted:.6f} but re-scoring gave {rescored:.6f}")
    winner = comparison[comparison["winner"]].iloc[0]
    schedule = SubnetSchedule.from_dict(json.loads(winner["schedule"]))
    exported = []
    for _, row in comparison.iterrows():
        name = row["method"].replace(" ", "-")
        info = {"role": "winner" if row["winner"] else row["method"], "method": row["method"],
                "proxy_loss": float(row["proxy_loss"]), "source_supernet": str(config.supernet)}
        sched = SubnetSchedule.from_dict(json.loads(row["schedule"]))
        exported.append({"name": name, **export_schedule(ctx.model, sched, config.out / "schedules" / name,
                                                         tc.timesteps, info, config.supernet)})
    latency: dict[str, Any] = {}
    if ctx.latency_table is not None:
        latency = _schedule_latency(tc, comparison, exported)
    atomic_write_text(config.out / "bucket_trials.csv", table.to_csv(index=False))
    atomic_write_text(config.out / "joint_trials.csv", trials_of_joint.to_csv(index=False))
    atomic_write_text(config.out / "schedules.csv", comparison.to_csv(index=False))
    schedule.save(config.out / "schedule.json")
    best = {
        "method": winner["method"], "mean_gflops": float(winner["mean_gflops"]),
        "flops_ratio": float(winner["flops_ratio"]),
        "proxy_loss": float(winner["proxy_loss"]), "schedule": schedule.to_dict(),
        "budget_gflops": ctx.budget / 1e9, "full_gflops": ctx.full_flops / 1e9, **latency,
        "knapsack_predicted_proxy": predicted,
        "model_config": cfg.to_dict(),
        "sample_steps": settings.sample_steps, "steps_per_bucket": tc.counts, "proxy_share_per_bucket": tc.weights,
        "comparison": json.loads(comparison.drop(columns=["schedule"]).to_json(orient="records")),
        "settings": search_settings(ctx),
        "notes": notes,
    }
    atomic_write_text(config.out / "best.json", json.dumps(best, indent=2, default=float) + "\n")
    return TimestepSearchResult(config.out, comparison, best, schedule, exported, notes)
