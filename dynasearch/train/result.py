"""What a training run did (:class:`TrainResult`, the same on every rank): its steps, time, final losses, the cost of
its sandwich step, and the summary table the CLI prints."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.table import Table

from ..checkpoint.native import SUPERNET_NAME
from .run_dir import RAW_NAME

__all__ = ["TrainResult"]


@dataclass
class TrainResult:
    """What a run did (the same on every rank; only rank 0 wrote files)."""

    TITLE: ClassVar[str] = "supernet training"
    LOSS_COLUMNS: ClassVar[tuple[str, ...]] = ("loss_max", "loss_min", "loss_random", "distill_min", "distill_random")

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
    precision: str = "fp32"  # the autocast precision the run trained in
    skipped_steps: int = 0  # fp16: steps skipped for inf/NaN gradients (over the whole run)

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
        for key in self.LOSS_COLUMNS:
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

    def summary_table(self) -> Table:
        """A rich Table: final losses, time, step rate, and the sandwich step's time against its FLOPs."""
        table = Table(title=f"{self.TITLE}: {self.model} -> {self.out}", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("steps", f"{self.step} (this session {self.start_step} -> {self.step})")
        skipped = f", {self.skipped_steps} steps skipped (inf/NaN gradients)" if self.precision == "fp16" else ""
        table.add_row("device", f"{self.device} x {self.world_size}, {self.precision}{skipped}")
        table.add_row("parameters", f"{self.params / 1e6:.2f} M")
        table.add_row("time", f"{self.seconds:.1f} s ({self.steps_per_second:.2f} steps/s)")
        for key, value in self.final_losses().items():
            if not math.isnan(value):
                table.add_row(f"{key} (last 50 steps)", f"{value:.4f}")
        self.add_cost_rows(table)
        table.add_row("weights", self.weights_text())
        return table

    def add_cost_rows(self, table: Table) -> None:
        """The rows on the cost of a step: the sandwich step's time against its FLOPs, and each subnet role's."""
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

    def weights_text(self) -> str:
        """Where the run's weights are."""
        return f"{self.out / SUPERNET_NAME} (EMA), {self.out / RAW_NAME}"
