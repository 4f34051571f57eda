"""Extra worker processes of a static search, and Ctrl-C handling that stops a worker after its running trial.

Workers 1..N-1 are spawned processes that open the same study and run trials until it holds ``--trials`` counted
ones; worker 0 runs in the calling process. A worker stops after its trial on Ctrl-C (forwarded by the parent)
or when the process that started it is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from .config import SearchConfig
from .context import prepare_search
from .objective import run_trials
from .proxy import ProxySet

__all__ = ["graceful_sigint", "start_workers"]


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


def _worker_main(config: SearchConfig, worker: int, parent: int | None = None, proxy: ProxySet | None = None) -> None:
    """Entry point of an extra worker process: Ctrl-C (from the terminal or the parent) stops after the trial."""
    stop = threading.Event()
    graceful_sigint(stop, once=False)  # the parent forwards Ctrl-C; a forced stop is its SIGTERM
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(parent, stop), daemon=True).start()
    torch.set_num_threads(1)
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
            p = ctx.Process(target=_worker_main, args=(config, w, os.getpid(), proxy), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    return procs
