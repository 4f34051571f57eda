"""Training arguments: :class:`TrainConfig` (validated, recorded in config.json), what every kind of run shares
(:class:`RunArgs`, the checks, :class:`RunKind`), the stored run's arguments, the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ..checkpoint.native import CONFIG_NAME, SUPERNET_NAME, read_config
from ..checks import SUBNET_BYTES, check_memory, check_seed
from ..errors import ConfigError, DynasearchError, TrainingError
from ..model.config import DIT_CONFIGS
from ..space import DEFAULT_SPACE
from .precision import PRECISIONS
from .presets import PRESETS, check_preset
from .tensorboard_log import require_logger

__all__ = [
    "DATA_SPLIT_SEED",
    "DEFAULT_MODEL",
    "NUMBER_RULES",
    "RESUMABLE",
    "SUPERNET_RUN",
    "ArgsDataclass",
    "RunArgs",
    "RunKind",
    "TrainConfig",
    "TrainingWarning",
    "check_ints",
    "check_numbers",
    "check_run_args",
    "check_scale_args",
    "flag",
    "fspath_fields",
    "learning_rate",
    "load_run_config",
]

DEFAULT_MODEL = "DiT-T/2"
"""The model trained when neither --model nor --init-from is given."""

DATA_SPLIT_SEED = 0
"""Seed of the train/val split (fixed, so every run and the quality metric share one validation set)."""

_DEVICES = ("auto", "cpu", "cuda")
RESUMABLE = ("steps", "ckpt_every", "log_every", "device", "out", "resume", "overwrite", "dist_timeout", "tf32",
             "compile", "grad_checkpoint", "log")
"""TrainConfig fields a resumed run may change (how long, how often, where and how fast it runs, what it logs to);
every other field -- the precision included -- must match the stored run."""


class TrainingWarning(UserWarning):
    """Something training worked around (e.g. a re-initialised label table)."""


class RunArgs(Protocol):
    """The arguments every kind of training run has (what the loop, the run directory and DDP read)."""

    out: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    ema_decay: float
    seed: int
    device: str
    ckpt_every: int
    log_every: int
    resume: bool
    overwrite: bool
    dist_timeout: float
    precision: str | None
    tf32: bool
    compile: bool
    grad_checkpoint: bool
    log: str
    preset: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (every field)."""
        ...


NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    "distill": (lambda v: v >= 0, ">= 0 (0 disables distillation)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dist_timeout": (lambda v: v > 0, "> 0"),
}
"""What each real-valued argument must be (check, wanted), by field name."""


T = TypeVar("T", bound="ArgsDataclass")


class ArgsDataclass:
    """The JSON round trip and validated copies of a frozen arguments dataclass (TrainConfig, FinetuneConfig)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form (every field)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload,no-any-return]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (older or newer runs), missing ones default."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def from_preset(cls: type[T], preset: str, **kwargs: Any) -> T:
        """The arguments of preset `preset` (see :mod:`dynasearch.train.presets`), `kwargs` overriding its values."""
        check_preset(preset)
        return cls(**{**PRESETS[preset], **kwargs, "preset": preset})


def fspath_fields(args: object, keys: Sequence[str]) -> None:
    """Store path-like values of these fields of a frozen dataclass as plain strings (JSON-ready)."""
    for key in keys:
        value = getattr(args, key)
        if isinstance(value, os.PathLike):
            object.__setattr__(args, key, os.fspath(value))


def check_ints(args: object, lows: dict[str, int]) -> None:
    """Raise TrainingError naming the flag unless each field of `lows` is an integer >= its lower bound."""
    for key, low in lows.items():
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TrainingError(f"{flag(key)} must be an integer >= {low}, got {value!r}")


def check_numbers(
    args: object, keys: Sequence[str], rules: dict[str, tuple[Callable[[float], bool], str]] = NUMBER_RULES
) -> None:
    """Raise TrainingError naming the flag unless each field in `keys` is a finite number its rule accepts."""
    for key in keys:
        ok, want = rules[key]
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise TrainingError(f"{flag(key)} must be {want}, got {value!r}")


def check_run_args(args: RunArgs) -> None:
    """The checks every run's arguments share: device, learning-rate schedule, --resume against --overwrite, seed."""
    if args.device not in _DEVICES:
        raise TrainingError(f"--device must be one of {', '.join(_DEVICES)}, got {args.device!r}")
    if args.lr_schedule not in ("constant", "cosine"):
        raise TrainingError(f"--lr-schedule must be constant or cosine, got {args.lr_schedule!r}")
    if args.resume and args.overwrite:
        raise TrainingError("--resume and --overwrite exclude each other")
    check_seed(args.seed, "--seed", TrainingError)
    check_scale_args(args)


def check_scale_args(args: RunArgs) -> None:
    """The checks of the options for training at scale: precision, TF32, compile, checkpointing, logger, preset."""
    if args.precision is not None and args.precision not in PRECISIONS:
        raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    for key in ("tf32", "compile", "grad_checkpoint"):
        if not isinstance(getattr(args, key), bool):
            raise TrainingError(f"{flag(key)} must be true or false, got {getattr(args, key)!r}")
    check_preset(args.preset)
    require_logger(args.log)


@dataclass(frozen=True)
class TrainConfig(ArgsDataclass):
    """Every argument of a supernet training run (recorded in the run's config.json).

    The defaults train DiT-T/2 on the embedded 8x8 digits (600 steps of batch 64, about 0.33 s a step on two idle
    CPU cores: ~3.5 minutes) and its largest subnet, and its half-FLOPs subnets, then draw recognisable digits.
    The learning rate is far above DiT's 1e-4 because the model is tiny and the run short (measured on digits:
    3e-3 with cosine decay reached in 600 steps what 1e-3 reached in ~1,000). ``ema_decay`` 0.999 with warm-up
    (see :class:`EMA`) suits such short runs; DiT's 0.9999 averages over ~10k steps and suits runs of 100k+ steps.
    Fine-tuning a pretrained DiT (``init_from``) takes DiT's recipe: ``TrainConfig.from_preset("dit-finetune",
    init_from=...)`` (``--preset dit-finetune``).
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
    precision: str | None = None  # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling); None: bf16 on CUDA, else fp32
    tf32: bool = True  # TF32 float32 matmuls and convolutions on CUDA
    compile: bool = False  # torch.compile each block (see dynasearch.train.compile)
    grad_checkpoint: bool = False  # per-block activation checkpointing
    log: str = "csv"  # csv (metrics.csv) | tensorboard (metrics.csv and OUT/tensorboard events)
    preset: str | None = None  # a named set of hyper-parameters (dynasearch.train.presets), recorded with the run

    def __post_init__(self) -> None:
        fspath_fields(self, ("out", "init_from", "space"))
        if self.model is not None and self.model not in DIT_CONFIGS:
            raise ConfigError(f"unknown model '{self.model}'; choose one of: {', '.join(DIT_CONFIGS)}")
        ints = {"steps": 1, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "sandwich": 0, "warmup_steps": 0}
        check_ints(self, ints)
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise TrainingError(f"--image-size must be a positive integer, got {self.image_size!r}")
        if self.image_size is not None:
            check_memory(4 * self.image_size**2, f"--image-size {self.image_size} (one image)", TrainingError)
        check_memory(self.sandwich * SUBNET_BYTES, f"--sandwich {self.sandwich} (subnets per step)", TrainingError)
        check_numbers(self, ("lr", "weight_decay", "grad_clip", "distill", "ema_decay", "min_lr_ratio", "dist_timeout"))
        check_run_args(self)
        if self.preset is not None and self.init_from is None:
            raise TrainingError(
                f"--preset {self.preset} is the recipe for fine-tuning a pretrained model: pass --init-from (a DiT "
                "checkpoint), or give --lr, --ema-decay, ... yourself to train from scratch"
            )

    @property
    def do_reorder(self) -> bool:
        """Whether heads and channels are re-ordered by importance before training."""
        return self.init_from is not None if self.reorder is None else bool(self.reorder)


def flag(key: str) -> str:
    """The command-line flag of a TrainConfig field ('batch_size' -> '--batch-size')."""
    return "--" + key.replace("_", "-")


A = TypeVar("A")


@dataclass(frozen=True)
class RunKind(Generic[A]):
    """What tells one kind of training run directory from another: the command that writes it, the dataclass of its
    arguments and the config.json section holding them, the file of its EMA weights, what a resume may change."""

    command: str  # the CLI command (named in the resume hint)
    section: str  # the config.json section holding the arguments
    arguments: type[A]  # their dataclass (with from_dict)
    weights: str  # the EMA weights' file name
    resumable: tuple[str, ...]  # argument fields a resumed run may change
    as_stored: tuple[str, ...] = ()  # fields whose None on a resume means "as stored"
    what: str = "training run"  # what its directory is called in messages


SUPERNET_RUN: RunKind[TrainConfig] = RunKind(
    "train-supernet", "train", TrainConfig, SUPERNET_NAME, RESUMABLE, ("model", "reorder", "precision")
)
"""A `dynasearch train-supernet` run directory."""


def load_run_config(out: str | Path, kind: RunKind[A] = SUPERNET_RUN) -> A:  # type: ignore[assignment]
    """The arguments stored in a run directory's config.json (what ``--resume`` continues)."""
    doc = read_config(out)
    args = doc.get(kind.section)
    if not isinstance(args, dict):
        raise TrainingError(
            f"'{out}' is not a {kind.what} directory: its {CONFIG_NAME} has no \"{kind.section}\" section"
        )
    try:
        return kind.arguments.from_dict(args)  # type: ignore[attr-defined,no-any-return]
    except DynasearchError as exc:
        raise TrainingError(f"'{out}/{CONFIG_NAME}': stored training arguments are invalid: {exc}") from None


def learning_rate(cfg: RunArgs, step: int) -> float:
    """Learning rate of optimiser step `step` (1-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps))
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
