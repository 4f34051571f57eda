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

import multiprocessing as mp
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .proxy import ProxySet
from .study import SearchConfig, prepare_search, run_trials


def graceful_sigint(stop: threading.Event, forward: Callable[[], None] | None = None, once: bool = True) -> Any:
    """Make Ctrl-C set `stop` (then call `forward`); with `once`, a second Ctrl-C raises KeyboardInterrupt.

    Returns the previous handler (for :func:`signal.signal`). Only call from the main thread.
    """

    def handler(signum: int, frame: Any) -> None:
        if once and stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if forward is not None:
            forward()

    return signal.signal(signal.SIGINT, handler)


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """Set `stop` once the process that started this worker is gone (checked every second)."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            stop.set()


def _worker_main(
    config_dict: dict[str, Any], worker: int, parent: int | None = None, proxy: ProxySet | None = None
) -> None:
    """Entry point of an extra worker process: Ctrl-C (from the terminal or the parent) stops after the trial."""
    stop = threading.Event()
    graceful_sigint(stop, once=False)  # the parent forwards Ctrl-C; a forced stop is its SIGTERM
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent, stop), daemon=True).start()
    torch.set_num_threads(1)
    config = SearchConfig(**{**config_dict, "supernet": Path(config_dict["supernet"]), "out": Path(config_dict["out"])})
    run_trials(prepare_search(config, proxy=proxy), worker=worker, stop=stop)


def start_workers(config: SearchConfig, proxy: ProxySet | None = None) -> list[mp.process.BaseProcess]:
    """Start workers 1..N-1 as processes (worker 0 runs in the calling process), handing them `proxy` if given."""
    ctx = mp.get_context("spawn")
    procs = []
    # workers start with Ctrl-C ignored (a terminal's SIGINT would otherwise hit them mid-import); _worker_main
    # then installs the graceful handler, and the parent repeats its SIGINT until they exit
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        for w in range(1, config.workers):
            p = ctx.Process(target=_worker_main, args=(asdict(config), w, os.getpid(), proxy), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return procs
