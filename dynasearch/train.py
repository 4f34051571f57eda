"""`dynasearch train-supernet`: sandwich-rule training of a dynamic DiT supernet.

One optimisation step (:func:`sandwich_step`, then one AdamW step):

1. the largest subnet of the search space on the ground-truth diffusion loss (epsilon MSE + variational bound);
2. the smallest subnet and ``sandwich`` random subnets (per-block heads, MLP width and token ratio drawn from the
   search space), each on the ground-truth loss plus ``distill`` x MSE(student epsilon, detached teacher epsilon);
3. each subnet does its own forward and backward (gradients accumulate, activation memory stays that of one
   subnet); then one optimiser step with gradient clipping, then the EMA update.

Every random draw of a step -- the batch indices, timesteps, noise, label dropout and subnets -- derives from
``(seed, step)`` (:func:`step_seed`), never from a global RNG. So ``--resume`` replays exactly the sequence an
uninterrupted run would have seen, and under DDP every rank builds the same *global* batch and takes its shard:
K ranks with a global batch B compute what one process with batch B computes (gradients are averaged by hand,
without a DDP wrapper, so parameters a subnet does not use simply contribute zeros).

The run directory holds ``supernet.safetensors`` (EMA weights, loadable with ``load_checkpoint(out)``),
``raw.safetensors`` (current weights), ``config.json``, ``train_state.pt`` (optimiser, RNG, step; tensors and
plain Python only) and ``metrics.csv``. Every file is written atomically; ``train_state.pt`` is written last and
``--resume`` checks that all files agree on the step.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import os
import pickle
import platform
import random
import shutil
import signal
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import (
    atomic_write_bytes,
    check_state_dict,
    atomic_write_text,
    infer_config_from_state_dict,
    load_dit_state_dict,
    load_weights,
    read_config,
    save_checkpoint,
    save_weights,
)
from .data import DatasetSplit, load_dataset, parse_data_spec
from .diffusion import GaussianDiffusion
from .ema import EMA
from .errors import CheckpointError, ConfigError, DynasearchError, TrainingError
from .flops import closed_form_flops
from .model.config import DIT_CONFIGS, DiTConfig, get_config
from .model.dit import DiT
from .searchspace import DEFAULT_SPACE, SearchSpace, load_space
from .slicing import reorder_by_importance
from .space import Subnet

__all__ = [
    "DEFAULT_MODEL",
    "TrainConfig",
    "TrainResult",
    "TrainBatch",
    "SubnetLoss",
    "TrainingWarning",
    "TrainingInterrupted",
    "train_supernet",
    "recover_run_dir",
    "sandwich_step",
    "sandwich_subnets",
    "draw_batch",
    "step_seed",
    "learning_rate",
    "load_run_config",
    "METRIC_COLUMNS",
    "RUN_FILES",
]

DEFAULT_MODEL = "DiT-T/2"
"""The model trained when neither --model nor --init-from is given."""

SUPERNET_NAME = "supernet.safetensors"
RAW_NAME = "raw.safetensors"
CONFIG_NAME = "config.json"
STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.csv"
RUN_FILES = (SUPERNET_NAME, RAW_NAME, CONFIG_NAME, STATE_NAME, METRICS_NAME)
"""The files a run directory holds."""
PENDING_DIR = ".checkpoint.tmp"
"""A checkpoint being written (its files, then COMMIT_NAME), renamed into place once complete."""
COMMIT_NAME = "COMMIT"

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

DATA_SPLIT_SEED = 0
"""Seed of the train/val split (fixed, so every run and the quality metric share one validation set)."""

_DEVICES = ("auto", "cpu", "cuda")
_RESUMABLE = ("steps", "ckpt_every", "log_every", "device", "out", "resume", "overwrite", "dist_timeout")
"""TrainConfig fields a resumed run may change; every other field must match the stored run."""


class TrainingWarning(UserWarning):
    """Something training worked around (e.g. a re-initialised label table)."""


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Every argument of a supernet training run (recorded in the run's config.json).

    The defaults train DiT-T/2 on the embedded 8x8 digits (600 steps of batch 64, about 0.33 s a step on two idle
    CPU cores: ~3.5 minutes) and its largest subnet, and its half-FLOPs subnets, then draw recognisable digits.
    The learning rate is far above DiT's 1e-4 because the model is tiny and the run short (measured on digits:
    3e-3 with cosine decay reached in 600 steps what 1e-3 reached in ~1,000). ``ema_decay`` 0.999 with warm-up
    (see :class:`EMA`) suits such short runs; DiT's 0.9999 averages over ~10k steps and suits runs of 100k+ steps.
    """

    model: str | None = None  # registry name; None: DEFAULT_MODEL, or the architecture of `init_from`
    data: str = "digits"  # digits | folder:PATH | npz:PATH
    image_size: int | None = None  # None: the data's own size (digits 8, folders 32, npz as stored)
    space: str = DEFAULT_SPACE  # shipped space name or YAML path
    steps: int = 600  # total optimiser steps (a resumed run continues to this step)
    batch_size: int = 64  # global batch (split evenly over DDP ranks)
    lr: float = 3e-3  # peak AdamW learning rate (DiT's 1e-4 suits its large models and long runs)
    warmup_steps: int = 50  # linear warm-up from lr / warmup_steps to lr
    lr_schedule: str = "cosine"  # constant | cosine (down to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max total gradient norm; 0 disables clipping
    sandwich: int = 2  # random subnets per step, besides the largest and the smallest
    distill: float = 1.0  # weight of in-place distillation; 0 disables it
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    out: str = "runs/supernet"
    ckpt_every: int = 500
    resume: bool = False
    overwrite: bool = False
    init_from: str | None = None  # a dynasearch checkpoint directory or an original DiT .pt state dict
    reorder: bool | None = None  # re-order heads/channels by importance first; None: on with init_from
    log_every: int = 25
    dist_timeout: float = 600.0  # seconds a collective may wait for a dead or stuck rank

    def __post_init__(self) -> None:
        for key in ("out", "init_from", "space"):
            value = getattr(self, key)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, key, os.fspath(value))
        if self.model is not None and self.model not in DIT_CONFIGS:
            raise ConfigError(f"unknown model '{self.model}'; choose one of: {', '.join(DIT_CONFIGS)}")
        ints = {"steps": 1, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "sandwich": 0, "warmup_steps": 0}
        for key, low in ints.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TrainingError(f"{_flag(key)} must be an integer >= {low}, got {value!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise TrainingError(f"--image-size must be a positive integer, got {self.image_size!r}")
        for key, ok, want in (
            ("lr", lambda v: v > 0, "> 0"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
            ("grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
            ("distill", lambda v: v >= 0, ">= 0 (0 disables distillation)"),
            ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("dist_timeout", lambda v: v > 0, "> 0"),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise TrainingError(f"{_flag(key)} must be {want}, got {value!r}")
        if self.device not in _DEVICES:
            raise TrainingError(f"--device must be one of {', '.join(_DEVICES)}, got {self.device!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.resume and self.overwrite:
            raise TrainingError("--resume and --overwrite exclude each other")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TrainingError(f"--seed must be an integer, got {self.seed!r}")

    @property
    def do_reorder(self) -> bool:
        """Whether heads and channels are re-ordered by importance before training."""
        return self.init_from is not None if self.reorder is None else bool(self.reorder)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (every field)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older or newer runs), missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load_run_config(out: str | Path) -> TrainConfig:
    """The TrainConfig stored in a run directory's config.json (what ``--resume`` continues)."""
    doc = read_config(out)
    train = doc.get("train")
    if not isinstance(train, dict):
        raise TrainingError(f"'{out}' is not a training run directory: its {CONFIG_NAME} has no \"train\" section")
    try:
        return TrainConfig.from_dict(train)
    except DynasearchError as exc:
        raise TrainingError(f"'{out}/{CONFIG_NAME}': stored training arguments are invalid: {exc}") from None


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step `step` (1-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------------------
# Per-step randomness: everything derives from (seed, step)
# ---------------------------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for one random stream ('batch', 'subnets', 'epoch') of one step; stable across platforms."""
    digest = hashlib.sha256(f"dynasearch:{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sandwich_subnets(space: SearchSpace, config: DiTConfig, seed: int, step: int, n_random: int) -> list[tuple[str, Subnet]]:
    """The step's subnets: ('max', largest), ('min', smallest), ('random-1', ...), ... ('random-N', ...)."""
    rng = random.Random(step_seed(seed, step, "subnets"))
    subnets = [("max", space.largest(config)), ("min", space.smallest(config))]
    subnets += [(f"random-{i + 1}", space.sample(config, rng)) for i in range(n_random)]
    return subnets


def subnets_digest(subnets: Sequence[tuple[str, Subnet]]) -> str:
    """An 8-hex digest of a step's subnets (for checking that two runs saw the same sequence)."""
    text = "|".join(f"{name}:{subnet.to_json()}" for name, subnet in subnets)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class _EpochOrder:
    """Sample positions step*B .. step*B+B-1 of an endless sequence of per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, "epoch"))
            self._cache[epoch] = torch.randperm(self.n, generator=gen)
        return self._cache[epoch]

    def indices(self, step: int, batch: int) -> Tensor:
        start = (step - 1) * batch
        parts, pos = [], start
        while pos < start + batch:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + batch - pos)
            parts.append(self._perm(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)  # (B,)


@dataclass
class TrainBatch:
    """One step's inputs: clean samples, labels (label dropout applied), timesteps, noise and the noised samples."""

    x0: Tensor  # (B, C, H, W)
    y: Tensor  # (B,) long; dropped labels are the null class
    t: Tensor  # (B,) long
    noise: Tensor  # (B, C, H, W)
    x_t: Tensor  # (B, C, H, W)

    def shard(self, rank: int, world: int) -> TrainBatch:
        """This rank's contiguous slice of the global batch."""
        n = self.x0.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        return TrainBatch(self.x0[sl], self.y[sl], self.t[sl], self.noise[sl], self.x_t[sl])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The batch on `device`."""
        return TrainBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def draw_batch(
    split: DatasetSplit,
    diffusion: GaussianDiffusion,
    seed: int,
    step: int,
    batch_size: int,
    label_dropout: float,
    order: _EpochOrder | None = None,
) -> TrainBatch:
    """The GLOBAL batch of `step`: indices, timesteps, noise and label dropout all drawn from (seed, step), on the CPU."""
    order = order or _EpochOrder(int(split.train_x.shape[0]), seed)
    idx = order.indices(step, batch_size)  # (B,)
    x0 = split.train_x[idx]  # (B, C, H, W)
    gen = torch.Generator().manual_seed(step_seed(seed, step, "batch"))
    t = diffusion.sample_timesteps(batch_size, gen, "cpu")  # (B,)
    noise = torch.randn(x0.shape, generator=gen)  # (B, C, H, W)
    drop = torch.rand(batch_size, generator=gen) < label_dropout  # (B,)
    y = torch.where(drop, torch.full_like(split.train_y[idx], split.num_classes), split.train_y[idx])  # (B,)
    x_t = diffusion.q_sample(x0, t, noise)  # (B, C, H, W)
    return TrainBatch(x0, y, t, noise, x_t)


# ---------------------------------------------------------------------------------------------------------------------
# The sandwich step
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SubnetLoss:
    """What one subnet of a sandwich step contributed (plain floats, this process's shard)."""

    name: str
    subnet: Subnet
    loss: float  # the objective it was trained on: gt (+ distill weight x distill for students)
    gt: float  # ground-truth diffusion loss (MSE + VB)
    distill: float  # MSE between its epsilon and the teacher's (0 for the teacher itself)
    seconds: float  # forward + backward wall time


def sandwich_step(
    model: DiT,
    diffusion: GaussianDiffusion,
    batch: TrainBatch,
    subnets: Sequence[tuple[str, Subnet]],
    distill: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> list[SubnetLoss]:
    """Forward and backward every subnet in turn on the same batch; gradients accumulate in `.grad`.

    The first subnet is the teacher (the largest, trained on the ground-truth loss); every later one is trained on
    the ground-truth loss plus ``distill`` x MSE(its epsilon, the teacher's detached epsilon). Labels are used as
    given (label dropout was applied once for the step), so the model's own label dropout is off. No optimiser
    step is taken.
    """
    c = batch.x0.shape[1]
    device_type = batch.x_t.device.type
    teacher_eps: Tensor | None = None
    results: list[SubnetLoss] = []
    for name, subnet in subnets:
        start = time.perf_counter()
        autocast = (
            torch.autocast(device_type=device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            output = model(batch.x_t, batch.t, batch.y, subnet=subnet, label_dropout=False)  # (B, C_out, H, W)
        output = output.float()
        gt = diffusion.loss_from_output(output, batch.x0, batch.x_t, batch.t, batch.noise)["loss"].mean()
        eps = output[:, :c]  # (B, C, H, W)
        if teacher_eps is None:
            objective, kd = gt, torch.zeros((), device=gt.device)
            teacher_eps = eps.detach()
        else:
            kd = F.mse_loss(eps if distill > 0 else eps.detach(), teacher_eps)  # logged even when not trained on
            objective = gt + distill * kd if distill > 0 else gt
        objective.backward()
        values = torch.stack([objective.detach(), gt.detach(), kd.detach()]).tolist()  # one sync per subnet
        results.append(SubnetLoss(name, subnet, values[0], values[1], values[2], time.perf_counter() - start))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Stopping: Ctrl-C (SIGINT) or SIGTERM finish the current step, write a checkpoint and exit
# ---------------------------------------------------------------------------------------------------------------------
class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM at a safe point, after writing a complete checkpoint of `step`."""

    def __init__(self, step: int, total: int, out: Path, signal_name: str, is_main: bool = True) -> None:
        self.step, self.total, self.out, self.signal_name, self.is_main = step, total, out, signal_name, is_main
        super().__init__(
            f"interrupted ({signal_name}) at step {step} of {total}; checkpoint saved; "
            f"resume with: dynasearch train-supernet --resume --out {out}"
        )

    def __str__(self) -> str:
        """The one-line message (KeyboardInterrupt's own str would be the args tuple's first item anyway)."""
        return str(self.args[0])


class _StopSignals:
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
        name = signal.Signals(signum).name
        if self.requested == name:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = self.requested or name


@contextlib.contextmanager
def _collective(ddp: _Dist, what: str, out: Path, last_ckpt: int | None) -> Any:
    """Turn a failed collective (a dead peer, a --dist-timeout) into one TrainingError line on this rank."""
    try:
        yield
    except RuntimeError as exc:
        if not ddp.enabled:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrainingError(
            f"DDP rank {ddp.rank} of {ddp.world}: {what} failed ({first}); another process died or stalled "
            f"for longer than --dist-timeout; {_kept(out, last_ckpt)}; resume with --resume"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers (no DDP wrapper: gradients are averaged by hand after the sandwich)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _setup_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(cfg, local_rank)
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist(), device
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
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _average_gradients(params: Sequence[torch.nn.Parameter], ddp: _Dist, bucket_bytes: int = 32 << 20) -> None:
    """Give every parameter a gradient (zeros where no subnet used it) and average them over the ranks."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ddp.enabled:
        return
    bucket: list[Tensor] = []
    size = 0
    for p in list(params) + [None]:  # type: ignore[list-item]
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


def _mean_over_ranks(values: list[float], ddp: _Dist, device: torch.device) -> list[float]:
    if not ddp.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return (tensor / ddp.world).tolist()


def _barrier(ddp: _Dist) -> None:
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


# ---------------------------------------------------------------------------------------------------------------------
# Run directory and model construction
# ---------------------------------------------------------------------------------------------------------------------
def _check_run_dir(cfg: TrainConfig) -> bool:
    """Decide, before anything is written, whether this run resumes; refuse to clobber an existing run."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"run directory '{out}' exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if cfg.resume:
        if STATE_NAME in entries:
            _check_writable(out)
            return True
        foreign = [e for e in entries if e not in RUN_FILES and not _is_temp(e)]
        if foreign:
            raise TrainingError(
                f"--resume: '{out}' holds no checkpoint ({STATE_NAME}) but other files (e.g. '{foreign[0]}'); "
                "nothing to resume"
            )
        _check_writable(out)
        return False  # nothing was checkpointed yet: start from scratch
    if entries and not cfg.overwrite:
        raise TrainingError(
            f"run directory '{out}' already exists and is not empty; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    _check_writable(out)
    return False


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _clear_run_files(out: Path) -> None:
    """Remove this package's run files (and stale temporary files); other files are left alone."""
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.is_dir() and entry.name == PENDING_DIR:
            shutil.rmtree(entry)
        elif entry.is_file() and (entry.name in RUN_FILES or _is_temp(entry.name)):
            entry.unlink()


def _check_writable(out: Path) -> None:
    """Refuse a run directory that cannot be created or written (checked before anything is loaded)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingError(f"run directory '{out}' cannot be created: '{probe}' is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingError(f"run directory '{out}' cannot be written: '{probe}' is read-only")


def _make_run_dir(out: Path) -> None:
    """Create the run directory and clear old run files (rank 0 of a fresh run)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        _clear_run_files(out)
        probe = out / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"run directory '{out}' cannot be written: {exc.strerror or exc}") from None


def _load_init_state(model: DiT, state: dict[str, Tensor], source: str) -> dict[str, list[str]]:
    """Copy an init state dict into `model`: routers may be missing, a label table of another class count is
    re-initialised (with a warning), any other missing key or shape mismatch is a CheckpointError."""
    expected = model.state_dict()
    table = "y_embedder.embedding_table.weight"
    state = dict(state)
    reinit: list[str] = []
    if table in state and table in expected and state[table].shape != expected[table].shape:
        got, want = tuple(state[table].shape), tuple(expected[table].shape)
        warnings.warn(
            f"{source}: label table {table} has shape {got} but the data needs {want} "
            f"({model.config.num_classes} classes + null); re-initialising it",
            TrainingWarning,
            stacklevel=3,
        )
        del state[table]
        reinit.append(table)
    check_state_dict(model, state, f"--init-from '{source}'", lambda k: ".token_router." in k or k in reinit)
    model.load_state_dict(state, strict=False)
    return {"reinitialised": reinit, "kept_init": [k for k in expected if k not in state]}


def _build_model(cfg: TrainConfig, split: DatasetSplit, stored_model: dict[str, Any] | None) -> tuple[DiT, dict[str, Any]]:
    """The supernet to train: from a resumed run's config, from scratch, or from --init-from (then re-ordered)."""
    data_fields = {"input_size": split.image_size, "in_channels": split.in_channels, "num_classes": split.num_classes}
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    if stored_model is not None:
        try:
            config = DiTConfig.from_dict(stored_model)
        except ConfigError as exc:
            raise TrainingError(f"--resume: model section of '{cfg.out}/{CONFIG_NAME}' is invalid: {exc}") from None
        return DiT(config), {"kind": "resume"}
    if cfg.init_from is None:
        config = get_config(cfg.model or DEFAULT_MODEL, **data_fields)
        info: dict[str, Any] = {"kind": "scratch"}
        model = DiT(config)
    else:
        src = Path(cfg.init_from)
        if src.is_dir():
            doc = read_config(src)
            try:
                base = DiTConfig.from_dict(doc["model"])
            except ConfigError as exc:
                raise CheckpointError(f"--init-from '{src}': {exc}") from None
            if base.is_sliced:
                raise TrainingError(f"--init-from '{src}' is a sliced model; a supernet needs full-width weights")
            weights = next((src / n for n in ("model.safetensors", SUPERNET_NAME) if (src / n).is_file()), None)
            if weights is None:
                raise CheckpointError(f"--init-from '{src}' has no weights file (model.safetensors or {SUPERNET_NAME})")
            state = load_weights(weights)
            kind = "dynasearch"
        elif src.exists():
            state = load_dit_state_dict(src)
            base = infer_config_from_state_dict(state, source=f"--init-from '{src}'")
            kind = "dit"
        else:
            raise CheckpointError(f"--init-from '{src}' does not exist")
        if cfg.model is not None and cfg.model != base.name:
            raise TrainingError(f"--init-from '{src}' holds a {base.name} but --model is {cfg.model}")
        try:
            config = base.supernet().replace(**data_fields)
        except ConfigError as exc:
            raise TrainingError(f"--init-from '{src}' cannot be used with this data: {exc}") from None
        model = DiT(config)
        info = {"kind": kind, "from": str(src), **_load_init_state(model, state, str(src))}
    if cfg.do_reorder:
        reorder_by_importance(model)
    info["reordered"] = cfg.do_reorder
    return model, info


def _versions() -> dict[str, str]:
    import numpy
    import safetensors

    from . import __version__

    return {
        "dynasearch": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": getattr(safetensors, "__version__", "?"),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics
# ---------------------------------------------------------------------------------------------------------------------
class _Metrics:
    """metrics.csv: rows buffered in memory and appended (fsync'd) on flush; a resume truncates rows past its step."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
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
                if any(r.get(c) is None for c in METRIC_COLUMNS) or not r["step"].isdigit():
                    continue
                if int(r["step"]) <= step and (not kept or int(r["step"]) > int(kept[-1]["step"])):
                    kept.append(r)
        if self.enabled:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.path, buf.getvalue())
        try:
            return float(kept[-1]["elapsed_seconds"]) if kept else 0.0
        except (KeyError, ValueError):
            return 0.0

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        self.rows.append(row)

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            self.pending = []
            return
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerows({k: _fmt_cell(v) for k, v in row.items()} for row in self.pending)
            handle.flush()
            os.fsync(handle.fileno())
        self.pending = []


def _fmt_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _save_run(
    out: Path, model: DiT, ema: EMA, optimizer: torch.optim.Optimizer, step: int, meta: dict[str, Any], metrics: _Metrics
) -> None:
    """Write a checkpoint of `step` as one transaction: every file goes to PENDING_DIR, then a COMMIT record, then the
    files are renamed into place; a crash before the record leaves the previous checkpoint whole, one after it is
    completed by :func:`recover_run_dir`."""
    metrics.flush()
    pending = out / PENDING_DIR
    try:
        if pending.exists():
            shutil.rmtree(pending)
        pending.mkdir()
        save_weights(
            model.state_dict(), pending / RAW_NAME, {"format": "dynasearch", "model": model.config.name, "step": str(step)}
        )
        extra = dict(meta)
        extra["step"] = step
        extra["train"] = {**meta["train"], "step": step}
        save_checkpoint(model, pending, extra=extra, weights_name=SUPERNET_NAME, state_dict=ema.state_dict())
        state: dict[str, Any] = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "ema_updates": ema.num_updates,
            "seed": meta["train"]["seed"],
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(pending / STATE_NAME, buf.getvalue())
        _fsync_dir(pending)
        atomic_write_text(pending / COMMIT_NAME, f"{step}\n")
        _apply_pending(out)
    except (OSError, CheckpointError) as exc:
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


def _apply_pending(out: Path) -> None:
    """Move a committed checkpoint's files into place (train_state.pt last) and remove the pending directory."""
    pending = out / PENDING_DIR
    for name in (RAW_NAME, SUPERNET_NAME, CONFIG_NAME, STATE_NAME):
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
            _apply_pending(out)
            done = "completed an interrupted checkpoint"
        elif pending.exists():
            shutil.rmtree(pending)
            done = "discarded an unfinished checkpoint"
        for entry in out.iterdir() if out.is_dir() else ():
            if entry.is_file() and _is_temp(entry.name):
                entry.unlink()
    except OSError as exc:
        raise TrainingError(f"--resume: cannot repair '{out}' after a crash: {exc.strerror or exc}") from None
    return done


def _restore_run(out: Path, model: DiT, ema: EMA, optimizer: torch.optim.Optimizer, doc: dict[str, Any]) -> int:
    """Load a checkpoint written by :func:`_save_run`; every file must be from the same step."""
    try:
        state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip().rstrip(".") for ln in str(exc).splitlines() if "Unsupported" in ln), "")
        raise TrainingError(
            f"--resume: '{out / STATE_NAME}' was refused: it holds pickled objects other than tensors"
            + (f" ({detail})" if detail else "") + "; no code in it was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other unpickling failure is a corrupt checkpoint
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainingError(f"--resume: '{out / STATE_NAME}' cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise TrainingError(f"--resume: '{out / STATE_NAME}' is not a dynasearch training state (no integer step)")
    step = int(state["step"])
    from safetensors import safe_open

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
        ema.load_state_dict(load_weights(out / SUPERNET_NAME), state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"--resume: the checkpoint in '{out}' does not fit the model: {exc}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return step


def _check_resume_args(cfg: TrainConfig, stored: TrainConfig, out: Path) -> None:
    """A resumed run must be the same run: only steps, checkpoint/log cadence and device may change.

    The stored arguments hold the resolved model name and reorder flag; None for those here means "as stored".
    """
    diffs = [
        f"{_flag(f.name)} {getattr(stored, f.name)!r} -> {getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in _RESUMABLE
        and getattr(cfg, f.name) != getattr(stored, f.name)
        and not (f.name in ("model", "reorder") and getattr(cfg, f.name) is None)  # None: "as stored"
    ]
    if diffs:
        raise TrainingError(
            f"--resume: '{out}' was trained with other arguments ({'; '.join(diffs)}); "
            "resume with the same arguments, or start a new run"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Result, progress and summary
# ---------------------------------------------------------------------------------------------------------------------
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


class _Progress:
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
        if self.enabled:
            (self.bar.console if self.bar is not None else self.console).print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def train_supernet(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a supernet with the sandwich rule (see the module docstring); DDP when launched by torchrun.

    Raises TrainingError (existing run directory, non-finite loss, inconsistent resume), DataError (bad data),
    CheckpointError (bad --init-from) or SearchSpaceError (bad --space) -- all before writing anything, except the
    non-finite loss, which keeps the last good checkpoint.
    """
    ddp, device = _setup_distributed(cfg)
    try:
        return _train(cfg, ddp, device, progress and ddp.is_main)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ddp: _Dist, device: torch.device, show: bool) -> TrainResult:
    out = Path(cfg.out)

    # -- the run directory: repair a crashed checkpoint (--resume), decide resume / refuse to clobber, on every rank
    repaired = None
    if cfg.resume and ddp.is_main:
        repaired = recover_run_dir(out)
    _barrier(ddp)
    resuming = _check_run_dir(cfg)
    doc = read_config(out) if resuming else None
    if resuming:
        stored = load_run_config(out)
        _check_resume_args(cfg, stored, out)
        if stored.steps != cfg.steps and cfg.lr_schedule == "cosine":
            warnings.warn(
                f"--resume with --steps {cfg.steps} (the run was started for {stored.steps}): the cosine learning "
                "rate is stretched to the new length from here on",
                TrainingWarning,
                stacklevel=3,
            )

    # -- data, search space, model (errors here are user errors, raised before any file is touched)
    split = load_dataset(parse_data_spec(cfg.data), image_size=cfg.image_size, seed=DATA_SPLIT_SEED)
    space = load_space(cfg.space)
    model, init_info = _build_model(cfg, split, doc["model"] if doc else None)
    config = model.config
    space.validate_for(config)
    if cfg.batch_size % ddp.world:
        raise TrainingError(f"--batch-size {cfg.batch_size} is not divisible by the {ddp.world} DDP processes")
    diffusion = GaussianDiffusion(learn_sigma=config.learn_sigma)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    ema = EMA(model, cfg.ema_decay)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    train_args = {**cfg.to_dict(), "model": config.name, "reorder": cfg.do_reorder}
    meta = {
        "train": train_args,
        "space": space.to_dict(),
        "data": split.describe(),
        "init": init_info,
        "seeds": {
            "seed": cfg.seed,
            "model_init": cfg.seed,
            "data_split": DATA_SPLIT_SEED,
            "per_step": "sha256('dynasearch:{seed}:{step}:{stream}')[:8], streams: epoch, batch, subnets",
        },
        "distributed": {"world_size": ddp.world, "backend": dist.get_backend() if ddp.enabled else None},
        "device": str(device),
        "versions": _versions(),
        "total_steps": cfg.steps,
    }

    # -- resume (all ranks read the checkpoint) or start fresh (rank 0 clears old run files)
    _barrier(ddp)
    start = 0
    metrics = _Metrics(out / METRICS_NAME, enabled=ddp.is_main)
    elapsed = 0.0
    if resuming:
        assert doc is not None
        start = _restore_run(out, model, ema, optimizer, doc)
        meta["init"] = doc.get("init", init_info)
        elapsed = metrics.restore(start)
    elif ddp.is_main:
        _make_run_dir(out)
    if ddp.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    _barrier(ddp)

    order = _EpochOrder(int(split.train_x.shape[0]), cfg.seed)
    reporter = _Progress(show, start, cfg.steps, cfg.log_every)
    if repaired:
        reporter.note(f"'{out}': {repaired} left by a crash")
    if resuming:
        reporter.note(f"resumed '{out}' at step {start} of {cfg.steps}")
    last_ckpt = start if resuming else None
    t_session = time.perf_counter()
    step = start
    stop = _StopSignals()
    try:
        stop.install()
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the step's global batch and subnets (same on every rank), then this rank's shard
            batch = draw_batch(split, diffusion, cfg.seed, step, cfg.batch_size, config.class_dropout_prob, order)
            batch = batch.shard(ddp.rank, ddp.world).to(device)
            subnets = sandwich_subnets(space, config, cfg.seed, step, cfg.sandwich)

            # forward + backward of every subnet, gradients averaged over ranks, one optimiser step, EMA
            optimizer.zero_grad(set_to_none=True)
            losses = sandwich_step(model, diffusion, batch, subnets, cfg.distill, autocast_dtype)
            with _collective(ddp, f"step {step}: averaging gradients over the DDP processes", out, last_ckpt):
                _average_gradients(params, ddp)
                flags = [float(stop.requested == name) for name in _StopSignals.NAMES]  # all ranks stop together
                values = _mean_over_ranks([v for r in losses for v in (r.loss, r.gt, r.distill)] + flags, ddp, device)
            stop_by = [name for name, v in zip(_StopSignals.NAMES, values[-len(flags) :]) if v > 0]
            del values[-len(flags) :]
            stop_by = stop_by or ([stop.requested] if not ddp.enabled and stop.requested else [])
            stop_now = bool(stop_by)
            for i, r in enumerate(losses):
                r.loss, r.gt, r.distill = values[3 * i : 3 * i + 3]
            _check_finite(losses, step, config, out, last_ckpt, metrics)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            if not math.isfinite(grad_norm):
                metrics.flush()
                raise TrainingError(
                    f"step {step}: the gradient norm is {grad_norm} although every subnet's loss is finite; "
                    + _kept(out, last_ckpt)
                )
            optimizer.step()
            ema.update(model)

            step_seconds = time.perf_counter() - t0
            elapsed += step_seconds
            row = _metrics_row(step, losses, lr, grad_norm, step_seconds, elapsed, config, cfg.batch_size, subnets)
            metrics.add(row)
            reporter.update(row)
            if step % cfg.log_every == 0:
                metrics.flush()
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now:
                if ddp.is_main:
                    _save_run(out, model, ema, optimizer, step, meta, metrics)
                last_ckpt = step
            if stop_now and step < cfg.steps:
                with _collective(ddp, f"step {step}: stopping on {stop_by[0]}", out, last_ckpt):
                    _barrier(ddp)  # rank 0 has finished writing before any process exits
                raise TrainingInterrupted(step, cfg.steps, out, stop_by[0], ddp.is_main)
    finally:
        stop.uninstall()
        reporter.close()
    seconds = time.perf_counter() - t_session
    if start >= cfg.steps:
        reporter.note(f"'{out}' is already at step {start} (--steps {cfg.steps}); nothing to do")
    _barrier(ddp)
    return TrainResult(
        out=out,
        step=max(step, start),
        start_step=start,
        total_steps=cfg.steps,
        model=config.name,
        params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        world_size=ddp.world,
        is_main=ddp.is_main,
        seconds=seconds,
        rows=metrics.rows,
        init=meta["init"],
    )


def _kept(out: Path, last_ckpt: int | None) -> str:
    if last_ckpt is None:
        return f"no checkpoint had been written yet to '{out}'"
    return f"the last good checkpoint (step {last_ckpt}) is kept in '{out}'"


def _check_finite(
    losses: list[SubnetLoss], step: int, config: DiTConfig, out: Path, last_ckpt: int | None, metrics: _Metrics
) -> None:
    for r in losses:
        if not (math.isfinite(r.loss) and math.isfinite(r.gt)):
            metrics.flush()
            raise TrainingError(
                f"step {step}: the loss of subnet '{r.name}' ({r.subnet.describe(config)}) is "
                f"{r.loss if not math.isfinite(r.loss) else r.gt}; training stopped, {_kept(out, last_ckpt)}"
            )


def _metrics_row(
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
