"""What a run reports: each step's metrics row, the non-finite loss check, the progress display and the summary
(:class:`TrainResult`)."""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..cost.flops import closed_form_flops
from ..errors import TrainingError
from ..model.config import DiTConfig
from ..model.subnet import Subnet
from .run_dir import RAW_NAME, SUPERNET_NAME, MetricsLog, kept_message

__all__ = ["TrainResult", "SubnetLoss", "Progress", "metrics_row", "check_finite", "subnets_digest"]


@dataclass
class SubnetLoss:
    """What one subnet of a sandwich step contributed (plain floats, this process's shard)."""

    name: str
    subnet: Subnet
    loss: float  # the objective it was trained on: gt (+ distill weight x distill for students)
    gt: float  # ground-truth diffusion loss (MSE + VB)
    distill: float  # MSE between its epsilon and the teacher's (0 for the teacher itself)
    seconds: float  # forward + backward wall time



@dataclass
class TrainResult:
    """What a run did (the same on every rank; only rank 0 wrote files)."""

    out: Path
    step: int  # the step reached (and checkpointed)
    start_step: int  # the step this session started from (0, or the resumed checkpoint's)
    total_steps: int
    model: str
    params: int
    device: str
    world_size: int
    is_main: bool
    seconds: float  # wall time of this session's training loop
    rows: list[dict[str, Any]] = field(default_factory=list)  # this session's metrics rows
    init: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_run(self) -> int:
        """Steps trained in this session."""
        return self.step - self.start_step

    @property
    def steps_per_second(self) -> float:
        """Average step rate of this session."""
        return self.steps_run / self.seconds if self.seconds > 0 else float("nan")

    def final_losses(self, last: int = 50) -> dict[str, float]:
        """Mean of the last `last` steps' losses (nan for columns without values)."""
        rows = self.rows[-last:]
        out = {}
        for key in ("loss_max", "loss_min", "loss_random", "distill_min", "distill_random"):
            vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            out[key] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def step_cost(self) -> dict[str, float]:
        """Medians (robust to a busy machine) of the step time, its forward GFLOPs, and each subnet role's time and
        GFLOPs; the first three steps (warm-up) are skipped when there are more."""
        rows = self.rows[min(3, max(0, len(self.rows) - 1)) :]
        if not rows:
            return {}
        out = {
            "step_seconds": statistics.median(r["step_seconds"] for r in rows),
            "sandwich_gflops": statistics.median(r["sandwich_gflops"] for r in rows),
        }
        for role in ("max", "min", "random"):
            pairs = [(r[f"sec_{role}"], r[f"gflops_{role}"]) for r in rows if not math.isnan(r[f"sec_{role}"])]
            if pairs:
                out[f"sec_{role}"] = statistics.median(p[0] for p in pairs)
                out[f"gflops_{role}"] = statistics.median(p[1] for p in pairs)
        return out

    def summary_table(self) -> Any:
        """A rich Table: final losses, time, step rate, and the sandwich step's time against its FLOPs."""
        from rich.table import Table

        table = Table(title=f"supernet training: {self.model} -> {self.out}", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("steps", f"{self.step} (this session {self.start_step} -> {self.step})")
        table.add_row("device", f"{self.device} x {self.world_size}")
        table.add_row("parameters", f"{self.params / 1e6:.2f} M")
        table.add_row("time", f"{self.seconds:.1f} s ({self.steps_per_second:.2f} steps/s)")
        for key, value in self.final_losses().items():
            if not math.isnan(value):
                table.add_row(f"{key} (last 50 steps)", f"{value:.4f}")
        cost = self.step_cost()
        if cost:
            per_proc = cost["sandwich_gflops"] / self.world_size
            rate = 3 * per_proc / cost["step_seconds"] if cost["step_seconds"] > 0 else float("nan")
            table.add_row(
                "sandwich step",
                f"{cost['step_seconds'] * 1e3:.1f} ms for {cost['sandwich_gflops']:.2f} fwd GFLOPs "
                f"(~{rate:.1f} GFLOP/s per process, fwd+bwd ~ 3x fwd)",
            )
            for role in ("max", "min", "random"):
                if f"sec_{role}" in cost:
                    sec, gf = cost[f"sec_{role}"], cost[f"gflops_{role}"] / self.world_size
                    table.add_row(
                        f"  {role} subnet{'s' if role == 'random' else ''}",
                        f"{sec * 1e3:.1f} ms, {gf:.3f} fwd GFLOPs ({3 * gf / sec if sec else 0:.1f} GFLOP/s)",
                    )
        table.add_row("weights", f"{self.out / SUPERNET_NAME} (EMA), {self.out / RAW_NAME}")
        return table


class Progress:
    """A rich progress bar on a terminal; plain lines every `log_every` steps otherwise; nothing when disabled."""

    def __init__(self, enabled: bool, start: int, total: int, log_every: int) -> None:
        self.enabled, self.total, self.log_every = enabled, total, log_every
        self.start, self.t0 = start, time.perf_counter()
        self.bar = None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console()
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]train[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, rate="", info="")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        """Show one finished step."""
        if not self.enabled:
            return
        step = row["step"]
        done = step - self.start
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        info = f"max {row['loss_max']:.4f} min {row['loss_min']:.4f}"
        if not math.isnan(row["loss_random"]):
            info += f" rand {row['loss_random']:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=f"{rate:.2f} steps/s", info=info)
        elif step % self.log_every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"step {step}/{self.total} | loss {info} | lr {row['lr']:.2e} | {rate:.2f} steps/s | eta {eta:.0f}s",
                  flush=True)

    def note(self, text: str) -> None:
        """Print a line above the progress display."""
        if self.enabled:
            (self.bar.console if self.bar is not None else self.console).print(text, highlight=False)

    def close(self) -> None:
        """Stop the progress display."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


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


def subnets_digest(subnets: Sequence[tuple[str, Subnet]]) -> str:
    """An 8-hex digest of a step's subnets (for checking that two runs saw the same sequence)."""
    text = "|".join(f"{name}:{subnet.to_json()}" for name, subnet in subnets)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def metrics_row(
    step: int,
    losses: list[SubnetLoss],
    lr: float,
    grad_norm: float,
    step_seconds: float,
    elapsed: float,
    config: DiTConfig,
    batch_size: int,
    subnets: list[tuple[str, Subnet]],
) -> dict[str, Any]:
    """One step's metrics row (metrics.csv columns plus per-role GFLOPs for the summary)."""
    nan = float("nan")
    by = {r.name: r for r in losses}
    rand = [r for r in losses if r.name.startswith("random")]
    gflops = {name: closed_form_flops(config, s, batch=batch_size) / 1e9 for name, s in subnets}
    rand_gf = [gflops[r.name] for r in rand]
    row = {
        "step": step,
        "loss_max": by["max"].gt,
        "loss_min": by["min"].gt if "min" in by else nan,
        "loss_random": statistics.fmean(r.gt for r in rand) if rand else nan,
        "distill_min": by["min"].distill if "min" in by else nan,
        "distill_random": statistics.fmean(r.distill for r in rand) if rand else nan,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_seconds": step_seconds,
        "elapsed_seconds": elapsed,
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
    return row
