"""``--log tensorboard``: the scalars of metrics.csv also written as TensorBoard events (``OUT/tensorboard/``) with
``torch.utils.tensorboard.SummaryWriter``; tensorboard is an optional extra (``pip install -e ".[tensorboard]"``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TrainingError

__all__ = ["LOGGERS", "TENSORBOARD_DIR", "TENSORBOARD_EXTRA", "TensorBoardSink", "require_logger"]

LOGGERS = ("csv", "tensorboard")
"""The --log choices: csv writes metrics.csv only, tensorboard writes it and the same scalars as events."""

TENSORBOARD_DIR = "tensorboard"
"""The run directory's folder of event files (``tensorboard --logdir OUT/tensorboard``)."""

TENSORBOARD_EXTRA = 'pip install -e ".[tensorboard]"'
"""How to install what --log tensorboard needs."""

_NOT_SCALARS = frozenset({"step", "subnets"})  # the x axis, and the subnets' digest (a string)


def require_logger(log: str) -> None:
    """Raise TrainingError unless `log` is a known logger whose package is importable (checked before any write)."""
    if log not in LOGGERS:
        raise TrainingError(f"--log must be one of {', '.join(LOGGERS)}, got {log!r}")
    if log == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise TrainingError(
                f"--log tensorboard needs the optional extra 'tensorboard' ({first}): {TENSORBOARD_EXTRA}"
            ) from None


class TensorBoardSink:
    """Appends metrics rows (the same numbers as metrics.csv, tag = column name, x = step) to event files in
    `log_dir`; the writer opens at the first rows. A resumed run passes `purge_step`: TensorBoard then drops the
    events the interrupted session wrote past the checkpoint."""

    def __init__(self, log_dir: Path, columns: Sequence[str], purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.columns = [c for c in columns if c not in _NOT_SCALARS]
        self._writer: Any = None

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add each row's numeric, non-NaN columns as scalars at its step, then flush the event file."""
        if not rows:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        for row in rows:
            for key in self.columns:
                value = row.get(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    continue  # an empty metrics.csv cell
                self._writer.add_scalar(key, float(value), global_step=int(row["step"]))
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (if one was opened)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
