"""Trial bookkeeping of a study: which trials count toward ``--trials``, crashed trials and their one retry.

Crashes: every trial records which process runs it and starts out marked ``crashed`` with the reason "the worker
process died during the trial"; the objective clears the mark when it returns or raises. A trial left RUNNING by
a dead worker (this machine: its process id is gone; other machines: its RDB heartbeat stopped) is failed at the
next start of any worker, and its parameters are enqueued once more (user attribute ``retry_of``; a retry that
crashes again is not retried). Crashed trials stay in the study as FAIL but do not count toward ``--trials``:
the study ends with exactly ``--trials`` counted trials (COMPLETE, or FAIL from the evaluation itself) and
every crashed one in addition. Finished trials are never run again.
"""

from __future__ import annotations

import optuna

from .storage import worker_is_dead

__all__ = [
    "ATTR_CRASHED",
    "ATTR_RETRY_OF",
    "ATTR_SEED",
    "ATTR_WORKER",
    "CRASH_REASON",
    "FINISHED",
    "INTERRUPT_REASON",
    "SearchInterrupted",
    "counted_trials",
    "crashed_numbers",
    "duplicate_seed",
    "finished_count",
    "frozen_trial",
    "recover_stale_trials",
    "retry_trial",
    "surplus_trial",
]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
"""The states of a trial that has run to its end."""
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


def frozen_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The stored trial with this number."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def crashed_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials whose worker died or was stopped mid-trial: they do not count toward --trials."""
    retried = {t.user_attrs[ATTR_RETRY_OF] for t in trials if ATTR_RETRY_OF in t.user_attrs}
    return {t.number for t in trials if t.state == _FAIL and (t.user_attrs.get(ATTR_CRASHED) or t.number in retried)}


def counted_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count toward --trials: COMPLETE, or FAIL from the evaluation itself."""
    crashed = crashed_numbers(trials)
    return [t for t in trials if t.state in FINISHED and t.number not in crashed]


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward --trials: completed, or failed in the evaluation (crashed ones are retried)."""
    return len(counted_trials(study.get_trials(deepcopy=False)))


def surplus_trial(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True when `target` earlier trials are already counted or running (exact counts across workers)."""
    trials = study.get_trials(deepcopy=False)
    earlier = [t for t in counted_trials(trials) if t.number < trial.number]
    running = [t for t in trials if t.state == _RUNNING and t.number < trial.number]
    return len(earlier) + len(running) >= target


def duplicate_seed(study: optuna.Study, trial: optuna.Trial) -> bool:
    """True when an earlier, unpruned trial carries the same seed subnet (two workers seeded a new study)."""
    key = trial.user_attrs.get(ATTR_SEED)
    if key is None:
        return False
    return any(
        t.number < trial.number and t.user_attrs.get(ATTR_SEED) == key and t.state != optuna.trial.TrialState.PRUNED
        for t in study.get_trials(deepcopy=False)
    )


def retry_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
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
    (Trials of dead workers on other machines are failed by the RDB heartbeat, which calls :func:`retry_trial`.)
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
        retry_trial(study, t)
    return failed
