"""`dynasearch bench search`: how fast each Optuna sampler finds the FLOPs-budgeted Pareto front.

The supernet, the space, the budget and the proxy set are prepared once (:func:`dynasearch.search.prepare_search`);
every (sampler, seed) run is an in-memory Optuna study driven by the search's own objective
(:func:`dynasearch.search.make_objective`) and seeded like ``dynasearch search`` seeds a new study. The proxy loss
is deterministic, so it is cached per subnet across runs. Hypervolume (GFLOPs, proxy loss; both minimised) of the
feasible trials after each trial uses one reference for every run: (budget GFLOPs, worst proxy loss of any run).
Every run starts with the same enqueued subnets (among them the smallest), so raising the reference loss adds the
same area to every curve and leaves "trials to reach random's final hypervolume" unchanged.

Besides Optuna's samplers, ``random-feasible`` is the baseline that uses what the closed-form FLOPs give for free:
uniform draws from the space, redrawn until they fit the budget, so that no proxy evaluation is spent on a subnet
known to be over budget (plain ``random`` spends most trials there at 0.5x).
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from ..model.subnet import Subnet
from ..report.data import hypervolume_2d
from ..search.config import SAMPLERS, SearchConfig
from ..search.context import prepare_search
from ..search.objective import make_objective
from ..search.study import make_sampler, seed_study
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = [
    "CachedEvaluator", "SearchBenchConfig", "bench_search", "feasible_draws", "hypervolume_curve", "trials_to_reach",
]

GOAL_FRACTION = 1 / 3
RANDOM_FEASIBLE = "random-feasible"
BENCH_SAMPLERS = (*SAMPLERS, RANDOM_FEASIBLE)
MAX_REDRAWS = 10_000


@dataclass(frozen=True)
class SearchBenchConfig(BenchConfig):
    """Which supernet and budget, which samplers, how many trials and seeds."""

    supernet: Path = Path("runs/demo")
    trials: int = 60
    seeds: int = 3
    samplers: tuple[str, ...] = BENCH_SAMPLERS
    flops: str = "0.5x"
    space: str | None = None
    proxy_samples: int = 512
    seed: int = 0  # first sampler seed (runs use seed, seed+1, ...) and the proxy set's seed
    enqueue: bool = True  # start every study with the largest, smallest and best uniform subnet, as the search does
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.check_positive("trials", "seeds", "proxy_samples", "threads")
        if not self.samplers:
            raise BenchError(f"--samplers must name at least one of {', '.join(BENCH_SAMPLERS)}")
        for s in self.samplers:
            if s not in BENCH_SAMPLERS:
                raise BenchError(f"--samplers: unknown sampler '{s}'; choose from {', '.join(BENCH_SAMPLERS)}")
        self.check_device()
        if len(set(self.samplers)) != len(self.samplers):
            raise BenchError(f"--samplers names a sampler twice: {','.join(self.samplers)}")
        self.check_seed()
        self.check_proxy_memory("proxy_samples")


class CachedEvaluator:
    """Wraps a proxy evaluator with a per-subnet cache (valid because the proxy loss is deterministic)."""

    def __init__(self, evaluator: Callable[[Subnet], float]) -> None:
        self.evaluator = evaluator
        self.cache: dict[Subnet, float] = {}
        self.hits = 0

    def __call__(self, subnet: Subnet) -> float:
        if subnet in self.cache:
            self.hits += 1
        else:
            self.cache[subnet] = self.evaluator(subnet)
        return self.cache[subnet]


def hypervolume_curve(
    gflops: np.ndarray, loss: np.ndarray, feasible: np.ndarray, reference: tuple[float, float]
) -> np.ndarray:
    """Hypervolume of the feasible points among the first n trials, for n = 1..len (nan losses are skipped)."""
    out = np.zeros(len(gflops))
    pts: list[tuple[float, float]] = []
    for i, (g, y, f) in enumerate(zip(gflops, loss, feasible, strict=True)):
        if f and np.isfinite(y):
            pts.append((float(g), float(y)))
        out[i] = hypervolume_2d(np.array(pts).reshape(-1, 2), reference)
    return out


def trials_to_reach(curve: np.ndarray, target: float) -> int | None:
    """The first trial count (1-based) at which `curve` reaches `target`, or None."""
    hit = np.nonzero(curve >= target * (1 - 1e-9))[0]
    return int(hit[0]) + 1 if len(hit) else None


def feasible_draws(ctx: Any, n: int, seed: int) -> list[dict[str, float]]:
    """`n` seeded uniform draws of trial parameters from the space, each redrawn until its FLOPs fit the budget."""
    rng = random.Random(seed)
    s, groups = ctx.space, len(ctx.groups)
    out: list[dict[str, float]] = []
    for _ in range(n):
        for _attempt in range(MAX_REDRAWS):
            params = {}
            for g in range(groups):
                params[f"attn_{g}"] = rng.choice(s.attn_rate)
                params[f"mlp_{g}"] = rng.choice(s.mlp_rate)
                params[f"tok_{g}"] = rng.choice(s.token_ratio)
            if ctx.flops(ctx.subnet_from_params(params)) <= ctx.budget:
                out.append(params)
                break
        else:
            raise BenchError(f"--flops: no subnet within the budget in {MAX_REDRAWS} random draws of space "
                             f"'{s.name}'; raise the budget")
    return out


def _run(ctx: Any, sampler: str, seed: int, trials: int, enqueue: bool) -> pd.DataFrame:
    """One in-memory study of `trials` trials (random-feasible: random with pre-drawn feasible trials); a row each."""
    optuna_sampler = "random" if sampler == RANDOM_FEASIBLE else sampler
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(optuna_sampler, seed, trials))
    if enqueue:
        seed_study(ctx, study)
    if sampler == RANDOM_FEASIBLE:
        queued = len(study.get_trials(deepcopy=False))
        for params in feasible_draws(ctx, max(0, trials - queued), seed):
            study.enqueue_trial(params)
    study.optimize(make_objective(ctx, study), n_trials=trials, catch=(Exception,))
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        flops = t.user_attrs.get("flops")
        done = t.state == optuna.trial.TrialState.COMPLETE and t.values is not None
        rows.append({
            "trial": t.number + 1,
            "state": t.state.name,
            "gflops": flops / 1e9 if flops is not None else np.nan,
            "proxy_loss": float(t.values[0]) if done else np.nan,
            "feasible": bool(flops is not None and flops <= ctx.budget),
        })
    return pd.DataFrame(rows)


def _run_all(cfg: SearchBenchConfig, ctx: Any, status: Callable[[str], None]) -> pd.DataFrame:
    """Every (sampler, seed) run's trials, one after the other, with the run's wall time."""
    runs: list[pd.DataFrame] = []
    for sampler in cfg.samplers:
        for s in range(cfg.seeds):
            status(f"{sampler}, seed {cfg.seed + s}: {cfg.trials} trials")
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                df = _run(ctx, sampler, cfg.seed + s, cfg.trials, cfg.enqueue)
            df.insert(0, "seed", cfg.seed + s)
            df.insert(0, "sampler", sampler)
            df["run_seconds"] = time.perf_counter() - start
            runs.append(df)
    return pd.concat(runs, ignore_index=True)


def _add_curves(curves: pd.DataFrame, reference: tuple[float, float]) -> None:
    """Add each run's hypervolume and best feasible loss after every trial (in place; nan before the first)."""
    hv, best = [], []
    for _, run in curves.groupby(["sampler", "seed"], sort=False):
        hv.append(hypervolume_curve(run["gflops"].to_numpy(float), run["proxy_loss"].to_numpy(float),
                                    run["feasible"].to_numpy(bool), reference))
        ok = run["proxy_loss"].where(run["feasible"]).to_numpy(float)
        best.append(np.fmin.accumulate(np.where(np.isnan(ok), np.inf, ok)))
    curves["hypervolume"] = np.concatenate(hv)
    curves["best_feasible_loss"] = np.concatenate(best)
    curves.loc[~np.isfinite(curves["best_feasible_loss"]), "best_feasible_loss"] = np.nan


def _sampler_row(
    cfg: SearchBenchConfig, sampler: str, curves: pd.DataFrame, mean: pd.Series, random_final: float | None,
    strong_final: float | None,
) -> dict[str, Any]:
    """One sampler's final hypervolume and loss over its seeds, and the trials it needs to reach random's final."""
    runs_of = curves[curves["sampler"] == sampler]
    finals = runs_of.groupby("seed")["hypervolume"].last()
    best_final = runs_of.groupby("seed")["best_feasible_loss"].last()
    reach = trials_to_reach(mean[sampler].to_numpy(), random_final) if random_final is not None else None
    per_seed = ([trials_to_reach(run["hypervolume"].to_numpy(), random_final) for _, run in runs_of.groupby("seed")]
                if random_final is not None else [])
    strong = trials_to_reach(mean[sampler].to_numpy(), strong_final) if strong_final is not None else None
    return {
        "sampler": sampler,
        "seeds": cfg.seeds,
        "trials": cfg.trials,
        "feasible_fraction": float(runs_of["feasible"].mean()),
        "final_hv_mean": float(finals.mean()),
        "final_hv_std": float(finals.std(ddof=0)),
        "best_loss_mean": float(best_final.mean()),
        "trials_to_random_final": reach,
        "fraction_of_trials": reach / cfg.trials if reach is not None else None,
        "goal_met": bool(reach is not None and reach <= GOAL_FRACTION * cfg.trials),
        "trials_to_random_final_per_seed": " ".join("-" if r is None else str(r) for r in per_seed),
        "seeds_within_third": sum(r is not None and r <= GOAL_FRACTION * cfg.trials for r in per_seed),
        "trials_to_random_feasible_final": strong,
        "seconds_per_run": float(runs_of.groupby("seed")["run_seconds"].first().mean()),
    }


def bench_search(cfg: SearchBenchConfig, status: Callable[[str], None] | None = None) -> BenchResult:
    """Run every sampler over `seeds` seeds; hypervolume curves and trials needed to reach random search's final HV."""
    status = status or (lambda _m: None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with bench_run(cfg.device, cfg.threads) as run:
        search_cfg = SearchConfig(supernet=cfg.supernet, flops=cfg.flops, out=Path("."), space=cfg.space,
                                  trials=cfg.trials, proxy_samples=cfg.proxy_samples, seed=cfg.seed, device=cfg.device)
        ctx = prepare_search(search_cfg)
        cached = CachedEvaluator(ctx.evaluator)
        ctx = dataclasses.replace(ctx, evaluator=cached)
        curves = _run_all(cfg, ctx, status)
    losses = curves["proxy_loss"].dropna()
    if losses.empty:
        raise BenchError("no trial of any run finished; nothing to measure")
    reference = (ctx.budget / 1e9, float(losses.max()))
    _add_curves(curves, reference)

    mean = curves.groupby(["sampler", "trial"], sort=False)["hypervolume"].mean()
    random_final = float(mean["random"].iloc[-1]) if "random" in cfg.samplers else None
    strong_final = float(mean[RANDOM_FEASIBLE].iloc[-1]) if RANDOM_FEASIBLE in cfg.samplers else None
    rows = [_sampler_row(cfg, sampler, curves, mean, random_final, strong_final) for sampler in cfg.samplers]
    table = pd.DataFrame(rows)
    notes = []
    if random_final is None:
        notes.append("random is not among --samplers: no reference for trials_to_random_final")
    optuna_rows = table[~table["sampler"].isin(["random", RANDOM_FEASIBLE])]
    summary = {
        "reference": {"gflops": reference[0], "proxy_loss": reference[1]},
        "budget_gflops": ctx.budget / 1e9,
        "full_gflops": ctx.full_flops / 1e9,
        "random_final_hv_mean": random_final,
        "random_feasible_final_hv_mean": strong_final,
        "goal": f"reach random search's final mean hypervolume within {GOAL_FRACTION:.0%} of the trials",
        "goal_met": {r["sampler"]: r["goal_met"] for r in rows if r["sampler"] not in ("random", RANDOM_FEASIBLE)},
        "all_optuna_samplers_met_goal": bool(len(optuna_rows) and optuna_rows["goal_met"].all()),
        "distinct_subnets_evaluated": len(cached.cache),
        "cache_hits": cached.hits,
        "threads": run.threads,
        "space": ctx.space.name,
        "model": ctx.model.config.name,
    }
    settings = {**asdict(cfg), "samplers": list(cfg.samplers)}
    curves = curves.drop(columns=["run_seconds"])
    mean_curves = mean.unstack(level=0)[list(cfg.samplers)].reset_index()  # trial, one mean-HV column per sampler
    mean_curves.columns.name = None
    return BenchResult("search", table, summary, settings, command_line("search", cfg), run.machine,
                       extra={"curves": curves, "mean": mean_curves}, notes=notes)
