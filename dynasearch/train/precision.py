"""Numerics of a training run: the autocast precision (``--precision fp32|bf16|fp16``), fp16's loss scaling
(:class:`LossScaler`: torch.amp.GradScaler, steps with inf/NaN gradients skipped and counted) and TF32 matmuls on
CUDA (``--tf32/--no-tf32``).

The parameters, the optimiser state and the EMA stay float32 in every precision; bf16 and fp16 only run the forward
(and so the backward) under ``torch.autocast``, on the CPU as on CUDA. fp16's narrow range needs the loss scaled
before the backward (gradients would underflow to 0 otherwise): the scale starts at 2**16, halves after a step
whose gradients hold an inf or NaN (the step is skipped: no AdamW step, no EMA update) and doubles after 2,000 good
steps -- GradScaler's defaults. bf16 has float32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import TrainingError

__all__ = [
    "AUTO_PRECISION",
    "FP16_INIT_SCALE",
    "PRECISIONS",
    "SCALER_COLUMNS",
    "LossScaler",
    "autocast_dtype",
    "check_precision",
    "make_scaler",
    "resolve_precision",
    "tf32_mode",
]

PRECISIONS = ("fp32", "bf16", "fp16")
"""The --precision choices."""

AUTO_PRECISION = {"cuda": "bf16", "cpu": "fp32"}
"""The precision of a run that names none, by device type (bf16 autocast on CUDA, plain float32 on the CPU)."""

FP16_INIT_SCALE = 2.0**16
"""fp16's initial loss scale (GradScaler's default)."""

SCALER_COLUMNS = ("loss_scale", "skipped_steps")
"""The metrics.csv columns an fp16 run adds: the loss scale after the step, the steps skipped so far (inf/NaN
gradients), across resumes."""

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The run's precision: `precision` as given, or (None) bf16 on CUDA and fp32 elsewhere."""
    if precision is None:
        return AUTO_PRECISION.get(device.type, "fp32")
    if precision not in PRECISIONS:
        raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None: no autocast, float32 throughout)."""
    return _DTYPES[precision]


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision this PyTorch cannot run on `device` (checked before anything is written)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return
    if not torch.amp.is_autocast_available(device.type):
        raise TrainingError(f"--precision {precision}: this PyTorch has no autocast on {device.type}; use fp32")
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)  # (2, 2)
        if probe.dtype != dtype:
            raise RuntimeError(f"autocast ran the matmul in {probe.dtype}")
        if precision == "fp16":
            torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TrainingError(f"--precision {precision} is not supported on {device.type} by this PyTorch ({first}); "
                            "use fp32" + (" or bf16" if precision == "fp16" else "")) from None


@dataclass
class LossScaler:
    """fp16's loss scaling: GradScaler, and how many optimiser steps it skipped for inf/NaN gradients."""

    scaler: torch.amp.GradScaler
    skipped: int = 0
    _last_skipped: bool = field(default=False, repr=False)

    def scale(self, loss: Tensor) -> Tensor:
        """The loss multiplied by the current scale (what is back-propagated)."""
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place (before clipping), noting any inf/NaN."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimiser step unless the gradients held an inf or NaN, then the scale update; True when taken.

        A skipped step is the one after which the scale shrank (GradScaler backs off exactly then)."""
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self._last_skipped = self.scaler.get_scale() < before
        self.skipped += int(self._last_skipped)
        return not self._last_skipped

    def row(self) -> dict[str, Any]:
        """The metrics columns of the last step (SCALER_COLUMNS)."""
        return {"loss_scale": float(self.scaler.get_scale()), "skipped_steps": self.skipped}

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers for train_state.pt (loadable with weights_only=True)."""
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s numbers."""
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))


def make_scaler(precision: str, device: torch.device) -> LossScaler | None:
    """fp16's loss scaler on `device` (None for fp32 and bf16, which need none)."""
    if precision != "fp16":
        return None
    return LossScaler(torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE))


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """On CUDA: float32 matmuls and convolutions in TF32 (`enabled`) or in full float32, restored afterwards; a
    no-op on other devices."""
    if device.type != "cuda":
        yield
        return
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("high" if enabled else "highest")  # "high": TF32 matmuls
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
