"""Optuna storages for studies: a journal file by default, any RDB URL (PostgreSQL) to share across machines.

Crash safety: the journal file is locked with ``flock`` (released by the kernel when a worker dies, so a
SIGKILLed worker never leaves a stale lock behind) and a half-written last line left by a killed writer is cut
off before the next append. RDB storages record Optuna heartbeats, so trials of a worker that died on another
machine are failed after :data:`GRACE_PERIOD` seconds; trials of a dead worker on this machine are detected at
once from the worker's process id (:func:`worker_identity`, :func:`worker_is_dead`).
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from ..errors import SearchError

try:  # flock: POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_JOURNAL",
    "GRACE_PERIOD",
    "HEARTBEAT_INTERVAL",
    "make_storage",
    "mask_url",
    "worker_identity",
    "worker_is_dead",
]

DEFAULT_JOURNAL = "study.journal"
HEARTBEAT_INTERVAL = 30
GRACE_PERIOD = 90
_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@]*:)(?P<pw>[^/]*)(?P<tail>@)")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd)=)(?P<pw>[^&;]*)", re.IGNORECASE)

StaleCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def mask_url(url: str) -> str:
    """The storage URL with any password (user:PASSWORD@ or ?password=) replaced by '***'."""
    masked = _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", masked)


class FlockJournalLock(JournalFileSymlinkLock):
    """Journal file lock with ``flock`` on 'FILE.flock': the kernel releases it when the holder dies.

    After acquiring it, a last line without its newline (a writer killed mid-append) is cut off, so the next
    append does not glue a record onto a broken one.
    """

    def __init__(self, filepath: str) -> None:
        """Lock `filepath` (the journal) through the sibling file `filepath`.flock."""
        super().__init__(filepath)
        self._journal = filepath
        self._flock_path = filepath + ".flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Block until this process holds the lock, then repair a torn last line."""
        fd = os.open(self._flock_path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        _cut_torn_tail(self._journal)
        return True

    def release(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _cut_torn_tail(path: str) -> None:
    """Truncate `path` after its last newline when it ends inside a record (only call while holding the lock)."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            pos = size
            while pos > 0:  # scan back in blocks for the last newline
                step = min(4096, pos)
                pos -= step
                f.seek(pos)
                block = f.read(step)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    f.truncate(pos + nl + 1)
                    return
            f.truncate(0)
    except FileNotFoundError:
        return


def _journal_lock(path: Path) -> JournalFileSymlinkLock:
    """flock where the platform has it (a dead worker cannot keep it), else Optuna's symlink lock."""
    if fcntl is None:  # pragma: no cover - Windows
        return JournalFileSymlinkLock(str(path))
    return FlockJournalLock(str(path))


def make_storage(url: str | None, out: Path, on_stale: StaleCallback | None = None) -> optuna.storages.BaseStorage:
    """A journal file in `out` (default), a journal file at a path, or an RDB storage for a URL with '://'.

    `on_stale` is called (by Optuna) for each trial that an RDB storage fails because its heartbeat stopped.
    """
    if url is None or "://" not in url:
        path = Path(url) if url is not None else Path(out) / DEFAULT_JOURNAL
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path), lock_obj=_journal_lock(path)))
        except OSError as exc:
            raise SearchError(f"study journal '{path}' cannot be opened: {exc.strerror or exc}") from None
    try:
        return _rdb_storage(url, on_stale)
    except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError as its cause
        driver = getattr(exc.__cause__, "name", None) or exc.name or "its driver"
        hint = " (PostgreSQL: pip install 'psycopg[binary]')" if url.startswith("postgresql") else ""
        raise SearchError(
            f"storage '{mask_url(url)}' needs a database driver that is not installed: {driver}{hint}"
        ) from None
    except Exception as exc:  # sqlalchemy raises many kinds; one line with the masked URL is what users need
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"storage '{mask_url(url)}' cannot be opened: {mask_url(first)}") from None


def _rdb_storage(url: str, on_stale: StaleCallback | None, attempts: int = 3) -> RDBStorage:
    """An RDB storage with heartbeats; retried when another worker creates Optuna's tables at the same moment."""

    def connect() -> RDBStorage:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" in Optuna 5: nothing to tell users
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=HEARTBEAT_INTERVAL,
                grace_period=GRACE_PERIOD,
                heartbeat_stale_trial_callback=on_stale,
            )

    for attempt in range(attempts - 1):
        try:
            return connect()
        except Exception as exc:
            from sqlalchemy.exc import IntegrityError, ProgrammingError

            if not isinstance(exc, (IntegrityError, ProgrammingError)):
                raise
            time.sleep(0.5 + attempt)
    return connect()


def _boot_id() -> str:
    """This machine's boot id (Linux), or '' where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str]:
    """State letter and start time (clock ticks since boot) of process `pid` (Linux), or ('', '') if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", ""
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name: field 3 (state) onwards
    return fields[0], fields[19]


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host name, boot id, process id and its start time (to tell a dead worker later)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid, "start": _proc_stat(pid)[1]}


def worker_is_dead(identity: Any) -> bool:
    """True when `identity` names a process of this machine (same host and boot) that no longer runs.

    Workers on other machines are never judged here (their trials go stale through RDB heartbeats).
    """
    if not isinstance(identity, dict) or "pid" not in identity:
        return False
    if identity.get("host") != socket.gethostname() or identity.get("boot", "") != _boot_id():
        return False
    pid = int(identity["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    state, start = _proc_stat(pid)
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    recorded = identity.get("start", "")
    return bool(recorded) and start not in ("", recorded)  # the pid now belongs to another process
