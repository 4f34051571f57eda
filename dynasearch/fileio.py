"""Files every stage writes and reads: atomic writes (a reader never sees half a file) and JSON with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DynasearchError


def umask_mode() -> int:
    """The mode a plain `open()` would give a new file (mkstemp's files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(
    path: str | Path, what: str, error: type[DynasearchError] = DynasearchError, missing: str | None = None
) -> Any:
    """The parsed JSON at `path`; `error` naming `what` and the path when it is missing, unreadable or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(missing or f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{what} '{path}' cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}") from None
