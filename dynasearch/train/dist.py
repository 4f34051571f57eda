"""Several processes and signals: DDP helpers (no wrapper; gradients averaged by hand), the one all-reduce of a step's
losses and stop requests (:class:`StepSync`), turning a dead or stuck peer into one clear error, and Ctrl-C / SIGTERM
as a request to stop at the end of the step."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import TrainingError
from .config import RunArgs
from .metrics import SubnetLoss
from .run_dir import kept_message

__all__ = [
    "DistInfo",
    "StepSync",
    "StopSignals",
    "TrainingInterrupted",
    "average_gradients",
    "barrier",
    "broadcast_weights",
    "collective",
    "mean_over_ranks",
    "resolve_train_device",
    "setup_distributed",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM at a safe point, after writing a complete checkpoint of `step`."""

    def __init__(
        self, step: int, total: int, out: Path, signal_name: str, is_main: bool = True, command: str = "train-supernet"
    ) -> None:
        self.step, self.total, self.out, self.signal_name, self.is_main = step, total, out, signal_name, is_main
        super().__init__(
            f"interrupted ({signal_name}) at step {step} of {total}; checkpoint saved; "
            f"resume with: dynasearch {command} --resume --out {out}"
        )

    def __str__(self) -> str:
        """The one-line message (KeyboardInterrupt's own str would be the args tuple's first item anyway)."""
        return str(self.args[0])


class StopSignals:
    """While installed, the first SIGINT or SIGTERM only records a request (honoured at the end of the step); the
    same signal again interrupts at once (KeyboardInterrupt), which checkpoint transactions also survive. The other
    signal is absorbed: torchrun answers Ctrl-C by sending SIGTERM to workers that are already stopping."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = tuple(sig.name for sig in SIGNALS)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the signals (only possible in the main thread; elsewhere they keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        """Signal handler: record the first request; the same signal again raises KeyboardInterrupt."""
        name = signal.Signals(signum).name
        if self.requested == name:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = self.requested or name


@contextlib.contextmanager
def collective(ddp: DistInfo, what: str, out: Path, last_ckpt: int | None) -> Any:
    """Turn a failed collective (a dead peer, a --dist-timeout) into one TrainingError line on this rank."""
    try:
        yield
    except RuntimeError as exc:
        if not ddp.enabled:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainingError(
            f"DDP rank {ddp.rank} of {ddp.world}: {what} failed ({first}); another process died or stalled "
            f"for longer than --dist-timeout; {kept_message(out, last_ckpt)}; resume with --resume"
        ) from None


@dataclass
class DistInfo:
    """This process's place in the process group (rank 0 of 1 without DDP)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files)."""
        return self.rank == 0


def resolve_train_device(cfg: RunArgs, local_rank: int) -> torch.device:
    """The device of this rank: CUDA (one GPU per local rank) when asked or available, else the CPU."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_distributed(cfg: RunArgs) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_train_device(cfg, local_rank)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(), device
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.dist_timeout))
        except (RuntimeError, ValueError) as exc:  # DistStoreError (a rank never came), bad MASTER_* variables
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise TrainingError(
                f"DDP rank {os.environ.get('RANK', '?')} of {world}: joining the process group at {where} failed "
                f"({first}); every process must start within --dist-timeout ({cfg.dist_timeout:g} s)"
            ) from None
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def average_gradients(params: Sequence[torch.nn.Parameter], ddp: DistInfo, bucket_bytes: int = 32 << 20) -> None:
    """Give every parameter a gradient (zeros where no subnet used it) and average them over the ranks."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ddp.enabled:
        return
    bucket: list[Tensor] = []
    size = 0
    for p in [*params, None]:  # type: ignore[list-item]
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat /= ddp.world
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def mean_over_ranks(values: list[float], ddp: DistInfo, device: torch.device) -> list[float]:
    """The mean of each value over the ranks (the values themselves without DDP)."""
    if not ddp.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return (tensor / ddp.world).tolist()


def broadcast_weights(model: torch.nn.Module, ddp: DistInfo) -> None:
    """Give every rank rank 0's weights (and buffers)."""
    if not ddp.enabled:
        return
    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


@dataclass
class StepSync:
    """What the ranks agree on after a step: each subnet's losses (their mean over the ranks) and the signals any rank
    received. Both travel in one vector, so one all-reduce a step carries them and every rank stops after the same
    step."""

    losses: list[SubnetLoss]
    stop_by: list[str]  # names of the signals received, in StopSignals.NAMES order; empty: carry on

    LOSS_FIELDS: ClassVar[tuple[str, ...]] = ("loss", "gt", "distill")

    @classmethod
    def local(cls, losses: list[SubnetLoss], requested: str | None) -> StepSync:
        """This rank's own view: its shard's losses and the signal it received (if any)."""
        return cls(losses, [requested] if requested else [])

    def pack(self) -> list[float]:
        """The vector of the all-reduce: every subnet's LOSS_FIELDS, then one 0/1 flag per StopSignals.NAMES."""
        values = [float(getattr(r, name)) for r in self.losses for name in self.LOSS_FIELDS]
        return values + [float(name in self.stop_by) for name in StopSignals.NAMES]

    def unpack(self, values: list[float]) -> StepSync:
        """The inverse of :meth:`pack` for these subnets (a flag any rank raised has a mean above 0)."""
        width = len(self.LOSS_FIELDS)
        rows = [values[i : i + width] for i in range(0, width * len(self.losses), width)]
        losses = [replace(r, **dict(zip(self.LOSS_FIELDS, row, strict=True)))
                  for r, row in zip(self.losses, rows, strict=True)]
        flags = values[width * len(self.losses) :]
        return StepSync(losses, [name for name, flag in zip(StopSignals.NAMES, flags, strict=True) if flag > 0])

    def all_reduce(self, ddp: DistInfo, device: torch.device) -> StepSync:
        """The ranks' agreement: one all-reduce of the packed vector (this rank's own view without DDP)."""
        return self.unpack(mean_over_ranks(self.pack(), ddp, device))


def barrier(ddp: DistInfo) -> None:
    """Wait for every rank; a dead or stuck peer becomes a TrainingError after --dist-timeout."""
    if not ddp.enabled:
        return
    try:
        dist.barrier()
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainingError(
            f"DDP rank {ddp.rank} of {ddp.world}: waiting for the other processes failed ({first}); another process "
            "died or stalled for longer than --dist-timeout"
        ) from None
