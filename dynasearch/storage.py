"""Optuna storages for studies: a journal file by default, any RDB URL (PostgreSQL) to share across machines."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from .errors import SearchError

__all__ = ["DEFAULT_JOURNAL", "make_storage", "mask_url"]

DEFAULT_JOURNAL = "study.journal"
_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@]+:)(?P<pw>[^/]*)(?P<tail>@)")


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by '***' (safe to print or write into reports)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url)


def make_storage(url: str | None, out: Path) -> optuna.storages.BaseStorage:
    """A journal file in `out` (default), a journal file at a path, or an RDB storage for a URL with '://'."""
    if url is None or "://" not in url:
        path = Path(url) if url is not None else Path(out) / DEFAULT_JOURNAL
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise SearchError(f"study journal '{path}' cannot be opened: {exc.strerror or exc}") from None
    try:
        return RDBStorage(url, heartbeat_interval=30, grace_period=90)
    except ImportError as exc:
        raise SearchError(f"storage '{mask_url(url)}' needs a database driver that is not installed: {exc.name}") from None
    except Exception as exc:  # sqlalchemy raises many kinds; one line with the masked URL is what users need
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SearchError(f"storage '{mask_url(url)}' cannot be opened: {mask_url(first)}") from None
