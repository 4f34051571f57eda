"""What each training step measures: the subnets' losses, the step's metrics row, the non-finite loss and gradient
checks, and metrics.csv (:class:`MetricsLog`)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..checks import disk_full, is_disk_full
from ..cost.flops import closed_form_flops
from ..errors import TrainingError
from ..fileio import atomic_write_text
from ..model.config import DiTConfig
from ..model.subnet import Subnet
from .run_dir import kept_message

__all__ = [
    "METRIC_COLUMNS",
    "MetricsLog",
    "RowSink",
    "StepDone",
    "SubnetLoss",
    "check_finite",
    "check_grad_norm",
    "metrics_row",
    "subnets_digest",
]

METRIC_COLUMNS = (
    "step",
    "loss_max",  # ground-truth diffusion loss (MSE + VB) of the largest subnet
    "loss_min",  # ... of the smallest subnet
    "loss_random",  # ... mean over the random subnets (empty with --sandwich 0)
    "distill_min",  # MSE between the smallest subnet's epsilon and the largest's
    "distill_random",  # ... mean over the random subnets
    "lr",
    "grad_norm",  # total gradient norm before clipping
    "step_seconds",  # wall time of the whole step (data, sandwich, all-reduce, optimiser, EMA)
    "elapsed_seconds",  # cumulated step time since the start of the run (across resumes)
    "sec_max",  # forward + backward time of the largest subnet
    "sec_min",
    "sec_random",  # summed over the random subnets
    "sandwich_gflops",  # closed-form forward GFLOPs of the step's subnets, summed, for the global batch
    "subnets",  # short digest of the step's subnets (same digest = same sampling sequence)
)
"""The columns of metrics.csv, in order."""


@dataclass
class SubnetLoss:
    """What one subnet of a sandwich step contributed (plain floats, this process's shard)."""

    name: str
    subnet: Subnet
    loss: float  # the objective it was trained on: gt (+ distill weight x distill for students)
    gt: float  # ground-truth diffusion loss (MSE + VB)
    distill: float  # MSE between its epsilon and the teacher's (0 for the teacher itself)
    seconds: float  # forward + backward wall time


def subnets_digest(subnets: Sequence[tuple[str, Subnet]]) -> str:
    """An 8-hex digest of a step's subnets (for checking that two runs saw the same sequence)."""
    text = "|".join(f"{name}:{subnet.to_json()}" for name, subnet in subnets)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass
class StepDone:
    """A finished step as its metrics row sees it: the ranks' agreed losses, the lr, the gradient norm, the times."""

    step: int
    losses: list[SubnetLoss]
    lr: float
    grad_norm: float  # before clipping
    step_seconds: float
    elapsed: float  # cumulated step time of the run (across resumes)
    subnets: list[tuple[str, Subnet]]

    def shared_row(self) -> dict[str, Any]:
        """The columns every kind of run records: step, lr, gradient norm, step and elapsed time."""
        return {"step": self.step, "lr": self.lr, "grad_norm": self.grad_norm, "step_seconds": self.step_seconds,
                "elapsed_seconds": self.elapsed}


def metrics_row(done: StepDone, config: DiTConfig, batch_size: int) -> dict[str, Any]:
    """One supernet step's metrics row (metrics.csv columns plus per-role GFLOPs for the summary)."""
    nan = float("nan")
    losses, subnets = done.losses, done.subnets
    by = {r.name: r for r in losses}
    rand = [r for r in losses if r.name.startswith("random")]
    gflops = {name: closed_form_flops(config, s, batch=batch_size) / 1e9 for name, s in subnets}
    rand_gf = [gflops[r.name] for r in rand]
    return {
        **done.shared_row(),
        "loss_max": by["max"].gt,
        "loss_min": by["min"].gt if "min" in by else nan,
        "loss_random": statistics.fmean(r.gt for r in rand) if rand else nan,
        "distill_min": by["min"].distill if "min" in by else nan,
        "distill_random": statistics.fmean(r.distill for r in rand) if rand else nan,
        "sec_max": by["max"].seconds,
        "sec_min": by["min"].seconds if "min" in by else nan,
        "sec_random": sum(r.seconds for r in rand) if rand else nan,
        "sandwich_gflops": sum(gflops.values()),
        "subnets": subnets_digest(subnets),
        # per-role FLOPs for the summary (not written to metrics.csv)
        "gflops_max": gflops["max"],
        "gflops_min": gflops.get("min", nan),
        "gflops_random": sum(rand_gf) if rand_gf else nan,
    }


class RowSink(Protocol):
    """Somewhere else the rows metrics.csv receives are written (TensorBoard events), as they are appended."""

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record these rows (just appended to metrics.csv)."""
        ...

    def close(self) -> None:
        """Finish writing."""
        ...


class MetricsLog:
    """metrics.csv: rows buffered in memory and appended (fsync'd) on flush, and then handed to `sink` (if any); a
    resume truncates rows past its step."""

    def __init__(
        self, path: Path, enabled: bool, columns: Sequence[str] = METRIC_COLUMNS, sink: RowSink | None = None
    ) -> None:
        self.path, self.enabled, self.columns, self.sink = path, enabled, tuple(columns), sink
        self.pending: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []  # this session's rows (for the summary)

    def restore(self, step: int) -> float:
        """Keep the rows up to `step` (rewritten atomically); returns their last elapsed_seconds."""
        if not self.path.is_file():
            return 0.0
        kept: list[dict[str, str]] = []
        with self.path.open(newline="") as handle:
            for r in csv.DictReader(handle):
                # skip a line torn by a crash (missing fields) and anything past the checkpoint
                if any(r.get(c) is None for c in self.columns) or not r["step"].isdigit():
                    continue
                if int(r["step"]) <= step and (not kept or int(r["step"]) > int(kept[-1]["step"])):
                    kept.append(r)
        if self.enabled:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.path, buf.getvalue())
        try:
            return float(kept[-1]["elapsed_seconds"]) if kept else 0.0
        except (KeyError, ValueError):
            return 0.0

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one step's row."""
        self.pending.append(row)
        self.rows.append(row)

    def flush(self) -> None:
        """Append the buffered rows (fsync'd); a no-op on ranks other than 0."""
        if not self.enabled or not self.pending:
            self.pending = []
            return
        size = self.path.stat().st_size if self.path.is_file() else 0
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        if size == 0:
            writer.writeheader()
        writer.writerows({k: _fmt_cell(v) for k, v in row.items()} for row in self.pending)
        try:
            with self.path.open("a", newline="") as handle:
                handle.write(buf.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:  # cut a half-appended row off again: the file holds whole rows only
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            if is_disk_full(exc):
                raise disk_full(self.path) from None
            raise
        if self.sink is not None:
            self.sink.write(self.pending)
        self.pending = []


def _fmt_cell(value: Any) -> Any:
    """A metrics.csv cell: floats to 6 significant digits, NaN as an empty cell."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def check_finite(
    losses: list[SubnetLoss], step: int, config: DiTConfig, out: Path, last_ckpt: int | None, metrics: MetricsLog
) -> None:
    """Raise TrainingError naming the step and the subnet when a subnet's loss is not finite."""
    for r in losses:
        if not (math.isfinite(r.loss) and math.isfinite(r.gt)):
            metrics.flush()
            raise TrainingError(
                f"step {step}: the loss of subnet '{r.name}' ({r.subnet.describe(config)}) is "
                f"{r.loss if not math.isfinite(r.loss) else r.gt}; training stopped, {kept_message(out, last_ckpt)}"
            )


def check_grad_norm(grad_norm: float, step: int, out: Path, last_ckpt: int | None, metrics: MetricsLog) -> None:
    """Raise TrainingError naming the step when the gradient norm is not finite (every loss being finite)."""
    if not math.isfinite(grad_norm):
        metrics.flush()
        raise TrainingError(
            f"step {step}: the gradient norm is {grad_norm} although every subnet's loss is finite; "
            + kept_message(out, last_ckpt)
        )
