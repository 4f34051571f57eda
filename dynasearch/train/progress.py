"""The live display of a training run: a rich progress bar on a terminal, a plain line every `log_every` steps
otherwise (logs, CI), nothing on DDP ranks other than 0."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import TextColumn

from ..progress_bar import progress_bar

__all__ = ["Progress", "sandwich_info"]


def sandwich_info(row: dict[str, Any]) -> str:
    """What the display shows of a supernet step: the largest, smallest and random subnets' losses."""
    info = f"max {row['loss_max']:.4f} min {row['loss_min']:.4f}"
    if not math.isnan(row["loss_random"]):
        info += f" rand {row['loss_random']:.4f}"
    return info


class Progress:
    """A rich progress bar on a terminal; plain lines every `log_every` steps otherwise; nothing when disabled.
    `describe` says what a step's metrics row shows (the supernet's losses by default)."""

    def __init__(
        self,
        enabled: bool,
        start: int,
        total: int,
        log_every: int,
        describe: Callable[[dict[str, Any]], str] = sandwich_info,
        label: str = "train",
    ) -> None:
        self.enabled, self.total, self.log_every, self.describe = enabled, total, log_every, describe
        self.start, self.t0 = start, time.perf_counter()
        self.bar: RichProgress | None = None
        if not enabled:
            return
        self.console = Console()
        if self.console.is_terminal:
            self.bar = progress_bar(
                f"[bold]{label}[/bold]",
                TextColumn("{task.fields[rate]}"),
                after=(TextColumn("{task.fields[info]}"),),
                console=self.console,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, rate="", info="")
            self.bar.start()

    def update(self, row: dict[str, Any]) -> None:
        """Show one finished step."""
        if not self.enabled:
            return
        step = row["step"]
        done = step - self.start
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        info = self.describe(row)
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
