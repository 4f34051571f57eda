"""The run directory: its files, checkpoints written as one transaction (and repaired after a crash), the checks
before a run starts or resumes, and restoring a checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..checkpoint.native import CONFIG_NAME, load_weights, save_checkpoint, save_weights
from ..checks import disk_full, is_disk_full
from ..errors import CheckpointError, DiskFullError, TrainingError
from ..fileio import atomic_write_bytes, atomic_write_text
from ..model.dit import DiT
from .config import SUPERNET_RUN, RunArgs, RunKind, flag
from .ema import EMA
from .precision import LossScaler
from .tensorboard_log import TENSORBOARD_DIR

__all__ = [
    "COMMIT_NAME",
    "METRICS_NAME",
    "PENDING_DIR",
    "PREVIOUS_DIR",
    "RAW_NAME",
    "RUN_DIRS",
    "RUN_FILES",
    "STATE_NAME",
    "check_resume_args",
    "check_run_dir",
    "kept_message",
    "make_run_dir",
    "recover_run_dir",
    "restore_previous_run",
    "restore_run",
    "run_files",
    "save_run",
]

RAW_NAME = "raw.safetensors"
STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.csv"


def run_files(kind: RunKind[Any]) -> tuple[str, ...]:
    """The files a run directory of `kind` holds (config.json and the EMA weights as in any checkpoint)."""
    return (kind.weights, RAW_NAME, CONFIG_NAME, STATE_NAME, METRICS_NAME)


RUN_FILES = run_files(SUPERNET_RUN)
"""The files a supernet run directory holds (config.json and supernet.safetensors as in any checkpoint)."""
RUN_DIRS = (TENSORBOARD_DIR,)
"""The folders a run directory may hold (--log tensorboard's events): moved aside and back like the run files."""
PREVIOUS_DIR = ".previous-run.tmp"
"""The run files an --overwrite replaces, kept until the new run commits its first checkpoint (put back if it fails
before that: an overwrite never deletes a run and then fails)."""
PENDING_DIR = ".checkpoint.tmp"
"""A checkpoint being written (its files, then COMMIT_NAME), renamed into place once complete."""
COMMIT_NAME = "COMMIT"


def check_run_dir(cfg: RunArgs, kind: RunKind[Any] = SUPERNET_RUN) -> bool:
    """Decide, before anything is written, whether this run resumes; refuse to clobber an existing run."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"run directory '{out}' exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if cfg.resume:
        if STATE_NAME in entries:
            check_writable(out)
            return True
        foreign = [e for e in entries if e not in run_files(kind) and e not in RUN_DIRS and not is_temp(e)]
        if foreign:
            raise TrainingError(
                f"--resume: '{out}' holds no checkpoint ({STATE_NAME}) but other files (e.g. '{foreign[0]}'); "
                "nothing to resume"
            )
        check_writable(out)
        return False  # nothing was checkpointed yet: start from scratch
    if entries and not cfg.overwrite:
        raise TrainingError(
            f"run directory '{out}' already exists and is not empty; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    check_writable(out)
    return False


def is_temp(name: str) -> bool:
    """Whether a directory entry is one of our temporary names ('.NAME.tmp')."""
    return name.startswith(".") and name.endswith(".tmp")


def clear_run_files(out: Path, kind: RunKind[Any] = SUPERNET_RUN) -> None:
    """Move this package's run files aside into PREVIOUS_DIR (remove them where it already holds an earlier run's)
    and remove stale temporary files; other files are left alone."""
    if not out.is_dir():
        return
    previous = out / PREVIOUS_DIR
    keep = not previous.exists() and any((out / name).is_file() for name in run_files(kind))
    if keep:
        previous.mkdir()
    for entry in out.iterdir():
        if entry.is_dir() and entry.name == PENDING_DIR:
            shutil.rmtree(entry)
        elif entry.is_dir() and entry.name in RUN_DIRS:
            if keep:
                os.replace(entry, previous / entry.name)
            else:
                shutil.rmtree(entry)
        elif entry.is_file() and entry.name in run_files(kind) and keep:
            os.replace(entry, previous / entry.name)
        elif entry.is_file() and (entry.name in run_files(kind) or is_temp(entry.name)):
            entry.unlink()


def discard_previous_run(out: Path) -> None:
    """The new run committed a checkpoint: the run files it replaced are deleted now."""
    shutil.rmtree(out / PREVIOUS_DIR, ignore_errors=True)


def restore_previous_run(out: Path, kind: RunKind[Any] = SUPERNET_RUN) -> None:
    """The new run failed before its first checkpoint: remove its files and put the replaced run's back."""
    previous = out / PREVIOUS_DIR
    if not previous.is_dir():
        return
    with contextlib.suppress(OSError):
        for name in run_files(kind):
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for entry in previous.iterdir():
            os.replace(entry, out / entry.name)
        previous.rmdir()


def check_writable(out: Path) -> None:
    """Refuse a run directory that cannot be created or written (checked before anything is loaded)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingError(f"run directory '{out}' cannot be created: '{probe}' is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingError(f"run directory '{out}' cannot be written: '{probe}' is read-only")


def make_run_dir(out: Path, kind: RunKind[Any] = SUPERNET_RUN) -> None:
    """Create the run directory and clear old run files (rank 0 of a fresh run)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        clear_run_files(out, kind)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out) from None
        raise TrainingError(f"run directory '{out}' cannot be written: {exc.strerror or exc}") from None


def save_run(
    out: Path,
    model: DiT,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
    kind: RunKind[Any] = SUPERNET_RUN,
    scaler: LossScaler | None = None,
) -> None:
    """Write a checkpoint of `step` (fp16's loss scale too, given a `scaler`) as one transaction: every file goes to
    PENDING_DIR, then a COMMIT record, then the files are renamed into place; a crash before the record leaves the
    previous checkpoint whole, one after it is completed by :func:`recover_run_dir`. The caller flushes metrics.csv
    first (its rows up to `step`)."""
    pending = out / PENDING_DIR
    try:
        if pending.exists():
            shutil.rmtree(pending)
        pending.mkdir()
        save_weights(
            model.state_dict(), pending / RAW_NAME,
            {"format": "dynasearch", "model": model.config.name, "step": str(step)},
        )
        extra = dict(meta)
        extra["step"] = step
        extra[kind.section] = {**meta[kind.section], "step": step}
        save_checkpoint(model, pending, extra=extra, weights_name=kind.weights, state_dict=ema.state_dict())
        state: dict[str, Any] = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "ema_updates": ema.num_updates,
            "seed": meta[kind.section]["seed"],
            "rng": {"torch": torch.get_rng_state()},
        }
        if scaler is not None:
            state["amp"] = scaler.state_dict()
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(pending / STATE_NAME, buf.getvalue())
        _fsync_dir(pending)
        atomic_write_text(pending / COMMIT_NAME, f"{step}\n")
        apply_pending(out)
        discard_previous_run(out)
    except (OSError, CheckpointError, DiskFullError) as exc:
        if not (pending / COMMIT_NAME).is_file():  # uncommitted: the previous checkpoint stays whole, no leftovers
            shutil.rmtree(pending, ignore_errors=True)
        if isinstance(exc, DiskFullError) or is_disk_full(exc):
            raise DiskFullError(f"cannot write the step-{step} checkpoint into '{out}': no space left on the device"
                                ) from None
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrainingError(f"cannot write the step-{step} checkpoint into '{out}': {detail}") from None


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def apply_pending(out: Path) -> None:
    """Move a committed checkpoint's files into place (train_state.pt last) and remove the pending directory."""
    pending = out / PENDING_DIR
    fixed = (RAW_NAME, CONFIG_NAME, STATE_NAME, COMMIT_NAME)
    weights = sorted(p.name for p in pending.iterdir() if p.name not in fixed and not is_temp(p.name))  # the EMA's
    for name in (RAW_NAME, *weights, CONFIG_NAME, STATE_NAME):
        if (pending / name).exists():
            os.replace(pending / name, out / name)
    _fsync_dir(out)
    shutil.rmtree(pending)


def recover_run_dir(out: str | Path) -> str | None:
    """Finish or discard a checkpoint a crash interrupted; remove stale temporary files. Returns what was done."""
    out = Path(out)
    pending = out / PENDING_DIR
    done = None
    if not pending.is_dir() and not (out / STATE_NAME).is_file():
        return None  # not a run directory (or nothing to repair): leave every file alone
    try:
        if (pending / COMMIT_NAME).is_file():
            apply_pending(out)
            done = "completed an interrupted checkpoint"
        elif pending.exists():
            shutil.rmtree(pending)
            done = "discarded an unfinished checkpoint"
        for entry in out.iterdir() if out.is_dir() else ():
            if entry.is_file() and is_temp(entry.name):
                entry.unlink()
    except OSError as exc:
        raise TrainingError(f"--resume: cannot repair '{out}' after a crash: {exc.strerror or exc}") from None
    return done


def restore_run(
    out: Path,
    model: DiT,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    doc: dict[str, Any],
    kind: RunKind[Any] = SUPERNET_RUN,
    scaler: LossScaler | None = None,
) -> int:
    """Load a checkpoint written by :func:`save_run` (fp16's loss scale into `scaler`); every file must be from the
    same step."""
    try:
        state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip().rstrip(".") for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise TrainingError(
            f"--resume: '{out / STATE_NAME}' was refused: it holds pickled objects other than tensors"
            + (f" ({detail})" if detail else "") + "; no code in it was run"
        ) from None
    except Exception as exc:  # any other unpickling failure is a corrupt checkpoint
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainingError(f"--resume: '{out / STATE_NAME}' cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainingError(f"--resume: '{out / STATE_NAME}' is not a dynasearch training state (no integer step)")
    step = int(state["step"])
    with safe_open(str(out / RAW_NAME), framework="pt") as handle:
        raw_step = (handle.metadata() or {}).get("step")
    steps = {STATE_NAME: step, CONFIG_NAME: doc.get("step"), RAW_NAME: int(raw_step) if raw_step else None}
    if len(set(steps.values())) != 1:
        found = ", ".join(f"{k} at step {v}" for k, v in steps.items())
        raise TrainingError(
            f"--resume: the checkpoint in '{out}' is inconsistent ({found}); it was interrupted while being "
            "written. Start again with --overwrite"
        )
    try:
        model.load_state_dict(load_weights(out / RAW_NAME))
        ema.load_state_dict(load_weights(out / kind.weights), state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and isinstance(state.get("amp"), dict):
            scaler.load_state_dict(state["amp"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise TrainingError(f"--resume: the checkpoint in '{out}' does not fit the model: {exc}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return step


def check_resume_args(cfg: RunArgs, stored: RunArgs, out: Path, kind: RunKind[Any] = SUPERNET_RUN) -> None:
    """A resumed run must be the same run: only steps, checkpoint/log cadence and device (`kind.resumable`) may
    change.

    The stored arguments hold resolved values (the model name and reorder flag of a supernet run); None for those
    (`kind.as_stored`) here means "as stored".
    """
    diffs = [
        f"{flag(f.name)} {getattr(stored, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(kind.arguments)  # type: ignore[arg-type]
        if f.name not in kind.resumable
        and getattr(cfg, f.name) != getattr(stored, f.name)
        and not (f.name in kind.as_stored and getattr(cfg, f.name) is None)  # None: "as stored"
    ]
    if diffs:
        raise TrainingError(
            f"--resume: '{out}' was trained with other arguments ({'; '.join(diffs)}); "
            "resume with the same arguments, or start a new run"
        )


def kept_message(out: Path, last_ckpt: int | None) -> str:
    """What an error says about the checkpoint that survives it."""
    if last_ckpt is None:
        return f"no checkpoint had been written yet to '{out}'"
    return f"the last good checkpoint (step {last_ckpt}) is kept in '{out}'"
