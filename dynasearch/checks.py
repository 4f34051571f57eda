"""Checks every command shares, run before anything is created, moved or deleted: numeric domains (seeds, finite
numbers, integer ranges), sizes that must fit in memory, path kinds, and what a full disk is reported as.

A leaf module: it imports nothing from the package but :mod:`dynasearch.errors`.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any

from .errors import DiskFullError, DynasearchError

__all__ = [
    "SEED_MAX",
    "SUBNET_BYTES",
    "check_dir",
    "check_finite",
    "check_int",
    "check_memory",
    "check_new_dir",
    "check_seed",
    "check_workers",
    "disk_full",
    "format_bytes",
    "is_disk_full",
    "memory_limit",
]

SEED_MAX = 2**32 - 1
"""The largest seed every random generator in the pipeline (torch, numpy, Optuna's samplers) accepts."""

SUBNET_BYTES = 1024
"""A lower bound of the memory one drawn subnet takes (its per-block choices as Python objects): a count of subnets
per step or per ratio whose objects alone cannot fit is refused."""

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def check_seed(value: Any, option: str = "--seed", error: type[DynasearchError] = DynasearchError) -> None:
    """Raise `error` naming `option` unless `value` is an integer seed in [0, 2**32 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise error(f"{option} must be an integer in [0, {SEED_MAX}] (2**32 - 1), got {value!r}")


def check_finite(
    value: Any, option: str, error: type[DynasearchError] = DynasearchError, low: float | None = None
) -> None:
    """Raise `error` naming `option` unless `value` is a finite number (and at least `low` when given)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (low is not None and value < low):
        want = "a finite number" + (f" >= {low:g}" if low is not None else "")
        raise error(f"{option} must be {want}, got {value!r}")


def check_int(
    value: Any, option: str, low: int, high: int | None = None, error: type[DynasearchError] = DynasearchError
) -> None:
    """Raise `error` naming `option` unless `value` is an integer in [low, high] (no upper bound: high None)."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"in [{low}, {high}]" if high is not None else f"of at least {low}"
        raise error(f"{option} must be an integer {span}, got {value!r}")


def check_workers(value: int, option: str = "--workers", error: type[DynasearchError] = DynasearchError) -> None:
    """Raise `error` when `value` processes are far more than this machine can run (8 per CPU)."""
    cpus = os.cpu_count() or 1
    if value > 8 * cpus:
        raise error(f"{option} {value} would start {value} processes; this machine has {cpus} CPUs "
                    f"(at most {8 * cpus} workers)")


def memory_limit() -> int:
    """Bytes of physical memory of this machine (what no single allocation can exceed); 1 TiB where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        return 2**40


def format_bytes(n: float) -> str:
    """'3.2 TB'-style size."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} EB"  # pragma: no cover


def check_memory(
    nbytes: float, what: str, error: type[DynasearchError] = DynasearchError, limit: int | None = None
) -> None:
    """Raise `error` when `what` (naming the option and its value) needs more bytes than this machine has."""
    limit = memory_limit() if limit is None else limit
    if nbytes > limit:
        raise error(f"{what} needs about {format_bytes(nbytes)} of memory; this machine has {format_bytes(limit)}")


def check_dir(path: str | Path, what: str, error: type[DynasearchError] = DynasearchError) -> Path:
    """`path` when it is an existing directory; else `error` saying whether it is missing or not a directory."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} '{path}' does not exist")
    if not path.is_dir():
        raise error(f"{what} '{path}' is a file, not a directory")
    return path


def check_new_dir(path: str | Path, what: str, error: type[DynasearchError] = DynasearchError) -> Path:
    """`path` when it is a directory or can be created as one (no file in the way, the nearest existing parent
    writable); else `error` naming the path and why."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise error(f"{what} '{path}' is a file, not a directory")
        probe = path
    else:
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise error(f"{what} '{path}' cannot be created: '{probe}' is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{what} '{path}' cannot be written: '{probe}' is read-only")
    return path


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the file system is full (DiskFullError, ENOSPC, a quota, or safetensors' wording of them)."""
    if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in _DISK_FULL):
        return True
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and ("No space left" in text or "StorageFull" in text
                                                        or "os error 28" in text)


def disk_full(path: str | Path | None, exc: BaseException | None = None) -> DiskFullError:
    """The one-line error of a write that found the disk full: the path (or the exception's own file name)."""
    name = path if path is not None else getattr(exc, "filename", None)
    where = f"'{name}'" if name is not None else "a file"
    return DiskFullError(f"cannot write {where}: no space left on the device")
