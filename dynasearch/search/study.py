"""FLOPs-budgeted multi-objective search (Optuna) of per-block widths and token ratios in a trained supernet.

Two objectives, both minimised: the quality proxy (:mod:`dynasearch.evaluate`) and the closed-form GFLOPs.
The budget is an Optuna constraint (``trial.set_constraint``), so every sampler treats over-budget trials as
infeasible. Studies live in an Optuna storage (a journal file in the output directory by default, or any RDB
URL), so a rerun resumes and several workers can share one study.

Crashes: every trial records which process runs it and starts out marked ``crashed`` with the reason "the worker
process died during the trial"; the objective clears the mark when it returns or raises. A trial left RUNNING by
a dead worker (this machine: its process id is gone; other machines: its RDB heartbeat stopped) is failed at the
next start of any worker, and its parameters are enqueued once more (user attribute ``retry_of``; a retry that
crashes again is not retried). Crashed trials stay in the study as FAIL but do not count toward ``--trials``:
the study ends with exactly ``--trials`` counted trials (COMPLETE, or FAIL from the evaluation itself) and
every crashed one in addition. Finished trials are never run again.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from ..checkpoint.native import load_checkpoint, read_config
from ..cost.flops import closed_form_flops, format_flops, parse_budget
from ..device import resolve_device
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import BudgetError, SearchError
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..search_space import DEFAULT_SPACE, SearchSpace, load_space
from .proxy import ProxyEvaluator, ProxySet, build_proxy_set, dataset_from_run_config
from .storage import (
    DEFAULT_JOURNAL,
    make_storage,
    mask_url,
    worker_identity,
    worker_is_dead,
)

__all__ = [
    "SAMPLERS",
    "check_study",
    "SearchConfig",
    "SearchContext",
    "SearchInterrupted",
    "prepare_search",
    "make_sampler",
    "run_trials",
    "subnet_params",
    "finished_count",
    "crashed_numbers",
    "recover_stale_trials",
]

SAMPLERS = ("tpe", "nsga2", "gp", "random")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
_FAIL, _RUNNING = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING
ATTR_WORKER, ATTR_CRASHED, ATTR_RETRY_OF, ATTR_SEED = "worker", "crashed", "retry_of", "seed"
CRASH_REASON = "the worker process died during the trial"
INTERRUPT_REASON = "stopped at once by a second Ctrl-C during the trial"


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search; the study is consistent and a rerun of the same command resumes it."""

    def __init__(self, finished: int, target: int) -> None:
        """`finished` of `target` trials were done when the search stopped."""
        super().__init__(f"interrupted after {finished} of {target} trials")
        self.finished = finished
        self.target = target


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


def prepare_search(config: SearchConfig, proxy: ProxySet | None = None) -> SearchContext:
    """Load the supernet and its data, resolve the space and the budget (raising clear errors).

    `proxy`: the proxy set another worker of this search already built (skips loading the dataset).
    """
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
    if proxy is None:
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


def _storage_exists(config: SearchConfig) -> bool:
    """True when opening the study's storage creates no file: a database URL, or a journal that exists."""
    if config.storage is not None and "://" in config.storage:
        return True
    journal = Path(config.storage) if config.storage is not None else config.out / DEFAULT_JOURNAL
    return journal.is_file()


def _check_settings(ctx: SearchContext, stored: Any) -> None:
    """Raise SearchError when a stored study's settings differ from this search's."""
    if stored is None or stored == _jsonable(ctx.settings):
        return
    diff = sorted(k for k in set(stored) | set(ctx.settings) if stored.get(k) != _jsonable(ctx.settings).get(k))
    raise SearchError(
        f"study '{ctx.config.study_name}' already exists with different settings ({', '.join(diff)}); "
        "use another --study-name or --out"
    )


def check_study(ctx: SearchContext) -> None:
    """Before anything is written: the storage opens and a study of the same name has the same settings.

    Writes nothing (no output directory, no journal record); a missing journal has no study to check.
    """
    if not _storage_exists(ctx.config):
        return
    storage = make_storage(ctx.config.storage, ctx.config.out)
    try:
        study_id = storage.get_study_id_from_name(ctx.config.study_name)
    except KeyError:
        return
    _check_settings(ctx, storage.get_study_user_attrs(study_id).get("dynasearch"))


def open_study(ctx: SearchContext, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or load the study; a study of the same name with other settings is an error (and is not touched)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(ctx.config.storage, ctx.config.out, on_stale=_retry)
    name = ctx.config.study_name
    try:
        _check_settings(ctx, storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("dynasearch"))
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:  # no such study yet (another worker may create it at the same moment: load_if_exists)
        try:
            study = optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, directions=["minimize", "minimize"], load_if_exists=True
            )
        except ValueError as exc:
            raise SearchError(f"study '{name}' in {mask_url(ctx.config.storage or 'the output directory')}: {exc}") from None
    stored = study.user_attrs.get("dynasearch")
    if stored is None:
        study.set_user_attr("dynasearch", ctx.settings)
    _check_settings(ctx, stored)
    return study


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def seed_study(ctx: SearchContext, study: optuna.Study) -> None:
    """Enqueue the largest, the smallest and the uniform subnet nearest the budget (only into a new study).

    Workers that start together may each enqueue the seeds; the objective prunes every copy but the first.
    """
    if study.get_trials(deepcopy=False):
        return
    s, n = ctx.space, len(ctx.groups)
    top = [max(s.attn_rate)] * n, [max(s.mlp_rate)] * n, [max(s.token_ratio)] * n
    low = [min(s.attn_rate)] * n, [min(s.mlp_rate)] * n, [min(s.token_ratio)] * n
    seeds = [subnet_params(n, *top), subnet_params(n, *low)]
    best_uniform = None
    for (a, m, r), subnet in s.uniform_subnets(ctx.model.config):
        f = ctx.flops(subnet)
        if f <= ctx.budget and (best_uniform is None or f > best_uniform[0]):
            best_uniform = (f, a, m, r)
    if best_uniform is not None:
        _, a, m, r = best_uniform
        seeds.append(subnet_params(n, [a] * n, [m] * n, [r] * n))
    for i, params in enumerate(seeds):
        study.enqueue_trial(params, user_attrs={ATTR_SEED: i}, skip_if_exists=True)


Evaluate = Callable[[SearchContext, optuna.Trial], tuple[tuple[float, float], str]]
"""Suggests a trial's parameters and scores them: ((proxy loss, GFLOPs), failure reason or '')."""


def make_objective(
    ctx: SearchContext, study: optuna.Study, stop: threading.Event | None = None, evaluate: Evaluate | None = None
) -> Callable[[optuna.Trial], tuple[float, float]]:
    """The objective: proxy loss and GFLOPs of the trial's subnet, with the budget as a constraint.

    Trials start only while `stop` is unset; a trial that starts recovers crashed trials first. `evaluate`
    replaces the static subnet's suggestion and scoring (the timestep-aware joint study suggests a schedule).
    """
    evaluate = evaluate or _evaluate

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        if stop is not None and stop.is_set():
            study.stop()
            raise optuna.TrialPruned("the search was interrupted")
        recover_stale_trials(study)
        if _surplus(study, trial, ctx.config.trials):
            study.stop()
            raise optuna.TrialPruned("the requested number of trials is already reached")
        if _duplicate_seed(study, trial):
            raise optuna.TrialPruned("another worker enqueued the same seed subnet first")
        trial.set_user_attr(ATTR_WORKER, worker_identity())
        trial.set_user_attr("fail_reason", CRASH_REASON)  # stays if the process dies before the trial ends
        trial.set_user_attr(ATTR_CRASHED, True)
        try:
            values, reason = evaluate(ctx, trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPT_REASON)
            _retry(study, _frozen(study, trial.number))
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            trial.set_user_attr(ATTR_CRASHED, False)
            raise
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr(ATTR_CRASHED, False)
        return values

    return objective


def _evaluate(ctx: SearchContext, trial: optuna.Trial) -> tuple[tuple[float, float], str]:
    """Suggest the trial's subnet and score it: ((proxy loss, GFLOPs), failure reason or '')."""
    s, n = ctx.space, len(ctx.groups)
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
    loss = ctx.evaluator(subnet)
    trial.set_user_attr("eval_seconds", time.perf_counter() - start)
    reason = "" if math.isfinite(loss) else f"proxy loss is {loss}"
    return (loss, flops / 1e9), reason


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The stored trial with this number."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def crashed_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials whose worker died or was stopped mid-trial: they do not count toward --trials."""
    retried = {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}
    return {t.number for t in trials if t.state == _FAIL and (t.user_attrs.get(ATTR_CRASHED) or t.number in retried)}


def _counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count toward --trials: COMPLETE, or FAIL from the evaluation itself."""
    crashed = crashed_numbers(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in crashed]


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True when `target` earlier trials are already counted or running (exact counts across workers)."""
    trials = study.get_trials(deepcopy=False)
    earlier = [t for t in _counted(trials) if t.number < trial.number]
    running = [t for t in trials if t.state == _RUNNING and t.number < trial.number]
    return len(earlier) + len(running) >= target


def _duplicate_seed(study: optuna.Study, trial: optuna.Trial) -> bool:
    """True when an earlier, unpruned trial carries the same seed subnet (two workers seeded a new study)."""
    key = trial.user_attrs.get(ATTR_SEED)
    if key is None:
        return False
    return any(
        t.number < trial.number and t.user_attrs.get(ATTR_SEED) == key and t.state != optuna.trial.TrialState.PRUNED
        for t in study.get_trials(deepcopy=False)
    )


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Enqueue a crashed trial's parameters once more (a retry that crashes too is not retried).

    The parameters are those it had suggested, over those it was enqueued with (a seed that crashed early).
    """
    if ATTR_RETRY_OF in trial.user_attrs:
        return
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={ATTR_RETRY_OF: trial.number})


def recover_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials of workers that died on this machine and retry them once; returns their numbers.

    Only the worker whose FAIL lands first retries a trial, so several workers recovering at once retry it once.
    (Trials of dead workers on other machines are failed by the RDB heartbeat, which calls :func:`_retry`.)
    """
    failed = []
    for t in study.get_trials(deepcopy=False, states=(_RUNNING,)):
        if not worker_is_dead(t.user_attrs.get(ATTR_WORKER)):
            continue
        try:
            study.tell(t.number, state=_FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first (and retries it)
        failed.append(t.number)
        _retry(study, t)
    return failed


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward --trials: completed, or failed in the evaluation (crashed ones are retried)."""
    return len(_counted(study.get_trials(deepcopy=False)))


def run_trials(
    ctx: SearchContext,
    worker: int = 0,
    on_trial: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
    evaluate: Evaluate | None = None,
    seed: Callable[[SearchContext, optuna.Study], None] | None = None,
) -> optuna.Study:
    """Run this worker's share of trials until the study holds `trials` counted ones (or `stop` is set).

    Crashed trials of earlier runs are failed and retried first; `stop` ends the loop after the running trial.
    `evaluate` and `seed` replace the static subnet's scoring and :func:`seed_study` (worker 0 seeds).
    """
    study = open_study(ctx, make_sampler(ctx.config.sampler, ctx.config.seed + worker, ctx.config.trials))
    if worker == 0:
        (seed or seed_study)(ctx, study)
    recover_stale_trials(study)
    if finished_count(study) >= ctx.config.trials or (stop is not None and stop.is_set()):
        return study

    def after_trial(st: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        done = finished_count(st)
        if on_trial is not None:
            on_trial(done)
        if done >= ctx.config.trials or (stop is not None and stop.is_set()):
            st.stop()

    study.optimize(make_objective(ctx, study, stop, evaluate), n_trials=None, callbacks=[after_trial], catch=(Exception,))
    return study








