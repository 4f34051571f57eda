"""The search's objective and trial loop: suggest a subnet, score its proxy loss and GFLOPs, until enough trials.

Each trial is scored on two objectives, both minimised (proxy loss, GFLOPs), with the FLOPs budget as the
constraint ``flops``. A worker's loop (:func:`run_trials`) recovers crashed trials first, starts trials only while
the study holds fewer than ``--trials`` counted ones, and stops after the running trial on Ctrl-C.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import optuna

from .context import SearchContext
from .latency import set_latency_constraint
from .storage import worker_identity
from .study import make_sampler, open_study, seed_study
from .trials import (
    ATTR_CRASHED,
    ATTR_WORKER,
    CRASH_REASON,
    INTERRUPT_REASON,
    duplicate_seed,
    finished_count,
    frozen_trial,
    recover_stale_trials,
    retry_trial,
    surplus_trial,
)

__all__ = ["Evaluate", "make_objective", "run_trials"]

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
        if surplus_trial(study, trial, ctx.config.trials):
            study.stop()
            raise optuna.TrialPruned("the requested number of trials is already reached")
        if duplicate_seed(study, trial):
            raise optuna.TrialPruned("another worker enqueued the same seed subnet first")
        trial.set_user_attr(ATTR_WORKER, worker_identity())
        trial.set_user_attr("fail_reason", CRASH_REASON)  # stays if the process dies before the trial ends
        trial.set_user_attr(ATTR_CRASHED, True)
        try:
            values, reason = evaluate(ctx, trial)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPT_REASON)
            retry_trial(study, frozen_trial(study, trial.number))
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
    if ctx.latency_table is not None:  # --latency: a second constraint, on the table's prediction
        set_latency_constraint(ctx, trial, subnet)
    trial.set_user_attr("flops", flops)
    trial.set_user_attr("subnet", subnet.to_dict())
    start = time.perf_counter()
    loss = ctx.evaluator(subnet)
    trial.set_user_attr("eval_seconds", time.perf_counter() - start)
    reason = "" if math.isfinite(loss) else f"proxy loss is {loss}"
    return (loss, flops / 1e9), reason


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

    study.optimize(make_objective(ctx, study, stop, evaluate), n_trials=None, callbacks=[after_trial],
                   catch=(Exception,))
    return study
