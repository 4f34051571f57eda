"""The one rich progress bar of every long command (training, search, sampling): columns and defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["progress_bar"]


def progress_bar(
    label: str = "{task.description}",
    *extra: TextColumn,
    after: Sequence[TextColumn] = (),
    console: Console | None = None,
    **kwargs: Any,
) -> Progress:
    """A Progress: label, bar, done/total, `extra` columns, elapsed and remaining time, then `after` columns."""
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *after,
    )
    return Progress(*columns, console=console, **kwargs)
