"""Files every stage writes and reads: atomic writes (a reader never sees half a file) and JSON with clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .checks import disk_full, is_disk_full
from .errors import DynasearchError


def umask_mode() -> int:
    """The mode a plain `open()` would give a new file (mkstemp's files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: readers never see half a file.

    A full disk raises DiskFullError naming `path`; the previous file (if any) is left as it was.
    """
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer to fill; rename it onto `path` when the block succeeds.

    On any failure the temporary file is removed and `path` is untouched; a full disk becomes DiskFullError.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path) from None
        raise
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(path) from None
        raise


def disk_guard(path: str | Path) -> contextlib.AbstractContextManager[None]:
    """Turn a full disk met inside the block into DiskFullError naming `path` (other errors pass through)."""
    return _DiskGuard(Path(path))


class _DiskGuard(contextlib.AbstractContextManager[None]):
    """See :func:`disk_guard`."""

    def __init__(self, path: Path) -> None:
        """Guard writes under `path`."""
        self.path = path

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        """Re-raise a full-disk error as DiskFullError."""
        if exc is not None and is_disk_full(exc):
            raise disk_full(getattr(exc, "filename", None) or self.path) from None


@contextlib.contextmanager
def removed_on_failure(path: str | Path, when: Callable[[BaseException], bool] | None = None) -> Iterator[None]:
    """Remove `path` if the block fails (with an error `when` accepts; None: any) and `path` did not exist before
    it: no empty or half-written leftovers."""
    path = Path(path)
    existed = path.exists() or path.is_symlink()
    try:
        yield
    except BaseException as exc:
        if not existed and (when is None or when(exc)):
            with contextlib.suppress(OSError):  # a path that could not even be created has nothing to remove
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def kept_on_failure(directory: str | Path, exclude: Callable[[str], bool] = lambda _n: False) -> Iterator[None]:
    """Make the files a block writes into `directory` (its top level) one transaction: if the block fails, files it
    created are removed and files it replaced are put back as they were (kept through hard links, which take no
    space on a full disk); names `exclude` accepts are left alone. Where hard links are impossible, the old files
    are left to the block's own atomic writes."""
    directory = Path(directory)
    before = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    kept: dict[str, Path] = {}
    for name in sorted(before):
        path = directory / name
        if exclude(name) or not path.is_file() or path.is_symlink() or _is_temp(name):
            continue
        link = directory / f".{name}.keep-{os.getpid()}.tmp"
        try:
            link.unlink(missing_ok=True)
            os.link(path, link)
            kept[name] = link
        except OSError:
            pass
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            for path in directory.iterdir() if directory.is_dir() else ():
                new = path.name not in before and not _is_temp(path.name) and not exclude(path.name)
                if new and path.is_file():
                    path.unlink()
        for name, link in kept.items():
            with contextlib.suppress(OSError):
                target = directory / name
                if target.exists() and os.path.samefile(link, target):  # untouched: rename would keep both names
                    link.unlink()
                else:
                    os.replace(link, target)
        raise
    for link in kept.values():
        link.unlink(missing_ok=True)


def _is_temp(name: str) -> bool:
    """Whether a directory entry is one of this package's temporary names ('.NAME.tmp')."""
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def replaced_on_success(paths: list[Path]) -> Iterator[None]:
    """Move each existing path of `paths` aside, run the block, then delete the moved copies; if the block fails
    the new paths are removed and the old ones moved back (an overwrite never loses the previous outputs)."""
    moved: list[tuple[Path, Path]] = []
    try:
        for path in paths:
            if path.exists():
                aside = path.with_name(f".{path.name}.old-{os.getpid()}.tmp")
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(path, aside)
                moved.append((path, aside))
    except OSError:
        for path, aside in reversed(moved):
            os.replace(aside, path)
        raise
    try:
        yield
    except BaseException:
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        for path, aside in moved:
            os.replace(aside, path)
        raise
    for _path, aside in moved:
        shutil.rmtree(aside, ignore_errors=True)


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
