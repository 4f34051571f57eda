"""`run_search`, the one entry point of a search: the space decides whether it is static or timestep-aware.

A space with ``timestep_buckets`` runs :func:`dynasearch.search.timestep.run_timestep_search`; any other runs the
static search here: worker 0 in this process and workers 1..N-1 as processes on one study, under one progress bar,
then every output is written once the study holds ``--trials`` counted trials.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading

from ..checks import is_disk_full
from ..errors import SearchError
from ..fileio import kept_on_failure, removed_on_failure
from ..progress_bar import progress_bar
from .config import SearchConfig, is_timestep_space
from .context import prepare_search
from .objective import run_trials
from .outputs import SearchResult, write_outputs
from .storage import DEFAULT_JOURNAL
from .study import check_study, make_sampler, open_study, seed_study
from .timestep import TimestepSearchResult, run_timestep_search
from .trials import SearchInterrupted, finished_count
from .workers import graceful_sigint, start_workers

__all__ = ["run_search", "run_static_search"]


def run_search(config: SearchConfig, progress: bool = True) -> SearchResult | TimestepSearchResult:
    """Run the search `config` asks for: timestep-aware when its space has timestep buckets, else static.

    Either resumes an earlier study of the same settings; Ctrl-C raises :class:`SearchInterrupted` with the
    outputs untouched, and a rerun of the same search resumes it.
    """
    # a full disk leaves no half-written new output directory behind (an existing one keeps its study for a rerun)
    with removed_on_failure(config.out, when=is_disk_full):
        if is_timestep_space(config):  # budgets on the mean FLOPs and/or the mean latency per sampler step
            return run_timestep_search(config, progress=progress)
        return run_static_search(config, progress=progress)


def run_static_search(config: SearchConfig, progress: bool = True) -> SearchResult:
    """Prepare, run (resuming any earlier study), and write every output of a static search.

    Ctrl-C (SIGINT) stops every worker after its running trial and raises :class:`SearchInterrupted` without
    touching the outputs (they stay those of the last finished run); a second Ctrl-C stops at once (the running
    trials are retried on resume). Either way a rerun of the same command resumes the study.
    """
    ctx = prepare_search(config)  # every input is checked before anything is written
    check_study(ctx)  # the storage opens and an existing study has the same settings
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(f"output directory '{config.out}' cannot be created: {exc.strerror}") from None
    # seed before any worker starts, so that no worker's first trial precedes the seeds
    seed_study(ctx, open_study(ctx, make_sampler(config.sampler, config.seed, config.trials)))
    stop = threading.Event()
    procs: list[mp.process.BaseProcess] = []

    def forward() -> None:
        print("stopping after the running trial(s); press Ctrl-C again to stop at once", file=sys.stderr, flush=True)
        for p in procs:
            if p.is_alive() and p.pid is not None:
                _signal(p.pid, signal.SIGINT)

    in_main = threading.current_thread() is threading.main_thread()
    previous = graceful_sigint(stop, forward) if in_main else None
    study = None
    try:
        procs.extend(start_workers(config, ctx.evaluator.proxy.to("cpu")) if config.workers > 1 else [])
        with progress_bar("[bold]search", disable=not progress, transient=False) as bar:
            task = bar.add_task("trials", total=config.trials)
            study = run_trials(ctx, worker=0, on_trial=lambda n: bar.update(task, completed=min(n, config.trials)),
                               stop=stop)
            for p in procs:
                while p.is_alive():
                    if stop.is_set() and p.pid is not None:  # again: a worker may have been starting up
                        _signal(p.pid, signal.SIGINT)
                    bar.update(task, completed=min(finished_count(study), config.trials))
                    p.join(timeout=0.5)
            bar.update(task, completed=min(finished_count(study), config.trials))
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the running trials are retried on resume
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        study = study or open_study(ctx, make_sampler(config.sampler, config.seed, config.trials))
        raise SearchInterrupted(finished_count(study), config.trials) from None
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    done = finished_count(study)
    if stop.is_set() and done < config.trials:
        raise SearchInterrupted(done, config.trials)
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if failed:
        raise SearchError(
            f"{len(failed)} search worker process(es) failed (exit codes {failed}); "
            "rerun the same command to resume the study"
        )
    try:
        with kept_on_failure(config.out, exclude=lambda name: name.startswith(DEFAULT_JOURNAL)):  # all or nothing
            return write_outputs(ctx, study)
    except KeyboardInterrupt:
        raise SearchInterrupted(done, config.trials) from None


def _signal(pid: int, sig: int) -> None:
    """Send `sig` to `pid`, ignoring a process that just exited."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
