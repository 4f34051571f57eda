"""FLOPs-budgeted multi-objective search (Optuna) of per-block widths and token ratios in a trained supernet.

Two objectives, both minimised: the quality proxy (:mod:`dynasearch.evaluate`) and the closed-form GFLOPs.
The budget is an Optuna constraint (``trial.set_constraint``), so every sampler treats over-budget trials as
infeasible. Studies live in an Optuna storage (a journal file in the output directory by default, or any RDB
URL), so a rerun resumes and several workers can share one study.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from .checkpoint import load_checkpoint, read_config
from .device import resolve_device
from .diffusion import GaussianDiffusion
from .errors import BudgetError, SearchError
from .evaluate import ProxyEvaluator, build_proxy_set, dataset_from_run_config
from .flops import closed_form_flops, format_flops, parse_budget
from .model.dit import DiT
from .searchspace import DEFAULT_SPACE, SearchSpace, load_space
from .space import Subnet
from .storage import make_storage, mask_url

__all__ = ["SAMPLERS", "SearchConfig", "SearchContext", "prepare_search", "make_sampler", "run_trials", "subnet_params"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)


@dataclass(frozen=True)
class SearchConfig:
    """Everything `dynasearch search` needs; one value per CLI option."""

    supernet: Path
    flops: str
    out: Path
    space: str | None = None
    trials: int = 200
    sampler: str = "tpe"
    storage: str | None = None
    study_name: str = "dynasearch"
    workers: int = 1
    seed: int = 0
    export_top: int = 3
    proxy_samples: int = 512
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SearchError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{self.sampler}'")
        for key in ("trials", "workers", "proxy_samples"):
            if getattr(self, key) < 1:
                raise SearchError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.export_top < 0:
            raise SearchError(f"--export-top must be 0 or more, got {self.export_top}")


@dataclass
class SearchContext:
    """What every worker builds once: the supernet, the space, the proxy evaluator and the budget."""

    config: SearchConfig
    model: DiT
    space: SearchSpace
    train_space: SearchSpace | None
    evaluator: ProxyEvaluator
    budget: int
    full_flops: int
    min_flops: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[list[int]]:
        """Block indices per decision group."""
        return self.space.groups(self.model.config)

    def subnet_from_params(self, params: dict[str, Any]) -> Subnet:
        """The subnet a trial's parameters describe."""
        n = len(self.groups)
        return self.space.subnet(
            self.model.config,
            [params[f"attn_{g}"] for g in range(n)],
            [params[f"mlp_{g}"] for g in range(n)],
            [params[f"tok_{g}"] for g in range(n)],
        )

    def flops(self, subnet: Subnet) -> int:
        """Closed-form FLOPs of a subnet (batch 1)."""
        return closed_form_flops(self.model.config, subnet)


def subnet_params(n_groups: int, attn: list[float], mlp: list[float], tok: list[float]) -> dict[str, float]:
    """Optuna parameters of per-group rates."""
    params: dict[str, float] = {}
    for g in range(n_groups):
        params[f"attn_{g}"], params[f"mlp_{g}"], params[f"tok_{g}"] = attn[g], mlp[g], tok[g]
    return params


def prepare_search(config: SearchConfig) -> SearchContext:
    """Load the supernet and its data, resolve the space and the budget (raising clear errors)."""
    doc = read_config(config.supernet)
    model = load_checkpoint(config.supernet, device=resolve_device(config.device))
    if model.config.is_sliced:
        raise SearchError(f"'{config.supernet}' is a sliced model; search needs a supernet (a training run directory)")
    train_space = SearchSpace.from_dict(doc["space"], source=f"{config.supernet}/config.json") if doc.get("space") else None
    if config.space is not None:
        space = load_space(config.space)
    else:
        space = train_space or load_space(DEFAULT_SPACE)
    space.validate_for(model.config)
    if train_space is not None:
        space.check_trained_on(train_space)
    full = closed_form_flops(model.config, Subnet.full(model.config))
    budget = parse_budget(config.flops, full)
    smallest = closed_form_flops(model.config, space.smallest(model.config))
    if budget < smallest:
        raise BudgetError(
            f"FLOPs budget '{config.flops}' ({format_flops(budget)}) is below the smallest subnet of space "
            f"'{space.name}', {format_flops(smallest)} ({smallest / full:.1%} of the full model)"
        )
    split = dataset_from_run_config(doc)
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    proxy = build_proxy_set(split.val_x, split.val_y, diffusion, num=config.proxy_samples, seed=config.seed)
    settings = {
        "supernet": str(config.supernet),
        "model": model.config.name,
        "space": space.to_dict(),
        "budget_flops": budget,
        "budget": config.flops,
        "full_flops": full,
        "proxy_samples": config.proxy_samples,
        "proxy_seed": config.seed,
    }
    return SearchContext(config, model, space, train_space, ProxyEvaluator(model, proxy), budget, full, smallest, settings)


def make_sampler(name: str, seed: int, trials: int = 200) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name; constraints reach it through `trial.set_constraint` (Optuna 5).

    The random start (TPE/GP startup trials, NSGA-II's first population) scales with the trial budget, so that
    short searches are not random searches in disguise.
    """
    startup = max(4, min(10, trials // 10))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(20, trials // 6)))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(ctx: SearchContext, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or load the study; a study of the same name with other settings is an error."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(ctx.config.storage, ctx.config.out)
    try:
        study = optuna.create_study(
            study_name=ctx.config.study_name,
            storage=storage,
            sampler=sampler,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
    except ValueError as exc:
        raise SearchError(f"study '{ctx.config.study_name}' in {mask_url(ctx.config.storage or 'the output directory')}: {exc}") from None
    stored = study.user_attrs.get("dynasearch")
    if stored is None:
        study.set_user_attr("dynasearch", ctx.settings)
    elif stored != _jsonable(ctx.settings):
        diff = sorted(k for k in set(stored) | set(ctx.settings) if stored.get(k) != _jsonable(ctx.settings).get(k))
        raise SearchError(
            f"study '{ctx.config.study_name}' already exists with different settings ({', '.join(diff)}); "
            "use another --study-name or --out"
        )
    return study


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def seed_study(ctx: SearchContext, study: optuna.Study) -> None:
    """Enqueue the largest, the smallest and the uniform subnet nearest the budget (only into a new study)."""
    if study.get_trials(deepcopy=False):
        return
    s, n = ctx.space, len(ctx.groups)
    top = [max(s.attn_rate)] * n, [max(s.mlp_rate)] * n, [max(s.token_ratio)] * n
    low = [min(s.attn_rate)] * n, [min(s.mlp_rate)] * n, [min(s.token_ratio)] * n
    seeds = [subnet_params(n, *top), subnet_params(n, *low)]
    best_uniform = None
    for a in s.attn_rate:
        for m in s.mlp_rate:
            for r in s.token_ratio:
                f = ctx.flops(s.uniform(ctx.model.config, a, m, r))
                if f <= ctx.budget and (best_uniform is None or f > best_uniform[0]):
                    best_uniform = (f, a, m, r)
    if best_uniform is not None:
        _, a, m, r = best_uniform
        seeds.append(subnet_params(n, [a] * n, [m] * n, [r] * n))
    for params in seeds:
        study.enqueue_trial(params, skip_if_exists=True)


def make_objective(ctx: SearchContext, study: optuna.Study) -> Callable[[optuna.Trial], tuple[float, float]]:
    """The objective: proxy loss and GFLOPs of the trial's subnet, with the budget as a constraint."""
    s, n = ctx.space, len(ctx.groups)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if _surplus(study, trial, ctx.config.trials):
            study.stop()
            raise optuna.TrialPruned("the requested number of trials is already reached")
        params = {}
        for g in range(n):
            params[f"attn_{g}"] = trial.suggest_categorical(f"attn_{g}", s.attn_rate)
            params[f"mlp_{g}"] = trial.suggest_categorical(f"mlp_{g}", s.mlp_rate)
            params[f"tok_{g}"] = trial.suggest_categorical(f"tok_{g}", s.token_ratio)
        subnet = ctx.subnet_from_params(params)
        flops = ctx.flops(subnet)
        trial.set_constraint("flops", (flops - ctx.budget) / ctx.budget)
        trial.set_user_attr("flops", flops)
        trial.set_user_attr("subnet", subnet.to_dict())
        start = time.perf_counter()
        try:
            loss = ctx.evaluator(subnet)
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        trial.set_user_attr("eval_seconds", time.perf_counter() - start)
        if not math.isfinite(loss):
            trial.set_user_attr("fail_reason", f"proxy loss is {loss}")
        return loss, flops / 1e9

    return objective


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True when `target` earlier trials are already finished or running (exact counts across workers)."""
    states = (*FINISHED, optuna.trial.TrialState.RUNNING)
    earlier = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < trial.number]
    return len(earlier) >= target


def finished_count(study: optuna.Study) -> int:
    """Trials that completed or failed."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_trials(ctx: SearchContext, worker: int = 0, on_trial: Callable[[int], None] | None = None) -> optuna.Study:
    """Run this worker's share of trials until the study holds `trials` finished ones."""
    study = open_study(ctx, make_sampler(ctx.config.sampler, ctx.config.seed + worker, ctx.config.trials))
    if worker == 0:
        seed_study(ctx, study)
    remaining = ctx.config.trials - finished_count(study)
    if remaining <= 0:
        return study
    callbacks = [optuna.study.MaxTrialsCallback(ctx.config.trials, states=FINISHED)]
    if on_trial is not None:
        callbacks.append(lambda st, _t: on_trial(finished_count(st)))
    study.optimize(make_objective(ctx, study), n_trials=remaining, callbacks=callbacks, catch=(Exception,))
    return study


def _worker_main(config_dict: dict[str, Any], worker: int) -> None:
    """Entry point of an extra worker process."""
    torch.set_num_threads(1)
    config = SearchConfig(**{**config_dict, "supernet": Path(config_dict["supernet"]), "out": Path(config_dict["out"])})
    run_trials(prepare_search(config), worker=worker)


def start_workers(config: SearchConfig) -> list[mp.process.BaseProcess]:
    """Start workers 1..N-1 as processes (worker 0 runs in the calling process)."""
    ctx = mp.get_context("spawn")
    procs = []
    for w in range(1, config.workers):
        p = ctx.Process(target=_worker_main, args=(asdict(config), w), daemon=True)
        p.start()
        procs.append(p)
    return procs
