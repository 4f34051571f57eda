"""The Optuna study of a search: its sampler, opening (or resuming) it in its storage, and its seed subnets.

Studies live in an Optuna storage (a journal file in the output directory by default, or any RDB URL), so a
rerun resumes and several workers can share one study. A study records the search's settings; opening one of the
same name with other settings is an error and leaves it untouched. The budget is an Optuna constraint
(``trial.set_constraint``), so every sampler treats over-budget trials as infeasible.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import optuna

from ..errors import SearchError
from .config import SearchConfig
from .context import SearchContext, subnet_params
from .storage import DEFAULT_JOURNAL, make_storage, mask_url
from .trials import ATTR_SEED, retry_trial

__all__ = ["METRIC_NAMES", "check_study", "make_sampler", "open_study", "seed_study"]


METRIC_NAMES = ("proxy_loss", "gflops")  # the two objectives, both minimised


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


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), to compare with stored settings."""
    return json.loads(json.dumps(value))


def _check_settings(ctx: SearchContext, stored: Any) -> None:
    """Raise SearchError when a stored study's settings differ from this search's."""
    if stored is None:
        return
    stored = {"proxy": "eps", **stored}  # a study from before proxy kinds recorded none: it was scored with eps
    if stored == _jsonable(ctx.settings):
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
    storage = make_storage(ctx.config.storage, ctx.config.out, on_stale=retry_trial)
    name = ctx.config.study_name
    try:
        _check_settings(ctx, storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("dynasearch"))
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:  # no such study yet (another worker may create it at the same moment: load_if_exists)
        try:
            study = optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, directions=["minimize", "minimize"],
                load_if_exists=True,
            )
        except ValueError as exc:
            raise SearchError(f"study '{name}' in {mask_url(ctx.config.storage or 'the output directory')}: "
                              f"{exc}") from None
    stored = study.user_attrs.get("dynasearch")
    if stored is None:
        study.set_user_attr("dynasearch", ctx.settings)
    if study.metric_names is None:  # optuna-dashboard's axis names (the budget is the constraint named 'flops')
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still so marked in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
    _check_settings(ctx, stored)
    return study


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
