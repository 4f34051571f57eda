"""`dynasearch train-supernet`: sandwich-rule supernet training (options -> TrainConfig -> train_supernet)."""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..model.config import DIT_CONFIGS
from ..space import DEFAULT_SPACE
from ..train.config import TrainConfig, TrainingWarning, load_run_config
from ..train.dist import TrainingInterrupted
from ..train.loop import train_supernet
from ._app import app, console, stop

ModelName = Enum("ModelName", {name: name for name in DIT_CONFIGS}, type=str)  # CLI choices from the registry


class Device(str, Enum):
    """--device choices."""
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LrSchedule(str, Enum):
    """--lr-schedule choices."""
    constant = "constant"
    cosine = "cosine"


_DEF = TrainConfig()  # the library's defaults, shown in --help


@app.command("train-supernet")
def train_supernet_command(
    ctx: typer.Context,
    model: Optional[ModelName] = typer.Option(
        None, help="Registry model (default DiT-T/2, or the architecture of --init-from)."
    ),
    data: str = typer.Option(_DEF.data, help="digits | folder:PATH (one sub-folder per class) | npz:PATH (x, y)."),
    image_size: Optional[int] = typer.Option(None, help="Resize images to this side (default: the data's own size)."),
    space: str = typer.Option(DEFAULT_SPACE, help="Search space the supernet is trained on: a shipped name or a YAML file."),
    steps: int = typer.Option(_DEF.steps, help="Total optimiser steps (a resumed run continues to this step)."),
    batch_size: int = typer.Option(_DEF.batch_size, help="Global batch size (split over DDP processes)."),
    lr: float = typer.Option(_DEF.lr, help="Peak AdamW learning rate."),
    warmup_steps: int = typer.Option(_DEF.warmup_steps, help="Linear learning-rate warm-up steps."),
    lr_schedule: LrSchedule = typer.Option(LrSchedule(_DEF.lr_schedule), help="Learning rate after warm-up."),
    min_lr_ratio: float = typer.Option(_DEF.min_lr_ratio, help="Cosine schedule: final lr as a fraction of --lr."),
    weight_decay: float = typer.Option(_DEF.weight_decay, help="AdamW weight decay."),
    grad_clip: float = typer.Option(_DEF.grad_clip, help="Max total gradient norm (0: no clipping)."),
    sandwich: int = typer.Option(_DEF.sandwich, help="Random subnets per step besides the largest and smallest."),
    distill: float = typer.Option(_DEF.distill, help="In-place distillation weight (0 disables it)."),
    ema_decay: float = typer.Option(_DEF.ema_decay, help="EMA decay (with warm-up); 0.9999 for long runs."),
    seed: int = typer.Option(_DEF.seed, help="Seed of the initial weights and of every step's sampling."),
    device: Device = typer.Option(Device(_DEF.device), help="auto: CUDA when available (bf16 autocast), else CPU."),
    out: Path = typer.Option(Path(_DEF.out), help="Run directory."),
    ckpt_every: int = typer.Option(_DEF.ckpt_every, help="Checkpoint every N steps (and at the end)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run files in an existing --out."),
    init_from: Optional[Path] = typer.Option(
        None, help="Start from a dynasearch checkpoint directory or an original DiT .pt state dict."
    ),
    reorder: Optional[bool] = typer.Option(
        None, "--reorder/--no-reorder", help="Re-order heads and channels by importance first (default: with --init-from)."
    ),
    log_every: int = typer.Option(_DEF.log_every, help="Append metrics (and print a line when not on a terminal) every N steps."),
    dist_timeout: float = typer.Option(_DEF.dist_timeout, help="Seconds a DDP collective waits for a stuck rank."),
) -> None:
    """Train a weight-sharing supernet with the sandwich rule (torchrun --nproc_per_node K -m dynasearch ... for DDP)."""
    given = {
        "model": model.value if model is not None else None,
        "data": data,
        "image_size": image_size,
        "space": space,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "lr_schedule": lr_schedule.value,
        "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "sandwich": sandwich,
        "distill": distill,
        "ema_decay": ema_decay,
        "seed": seed,
        "device": device.value,
        "out": str(out),
        "ckpt_every": ckpt_every,
        "resume": resume,
        "overwrite": overwrite,
        "init_from": str(init_from) if init_from is not None else None,
        "reorder": reorder,
        "log_every": log_every,
        "dist_timeout": dist_timeout,
    }
    cfg = TrainConfig(**given)
    if resume and (out / "config.json").is_file() and (out / "train_state.pt").is_file():
        # Options left at their defaults take the stored run's values; explicitly given ones must agree with it.
        explicit = {k for k in given if _is_explicit(ctx, k)} | {"out", "resume"}
        cfg = load_run_config(out).replace(**{k: v for k, v in given.items() if k in explicit}, overwrite=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        try:
            result = train_supernet(cfg, progress=True)
        except TrainingInterrupted as exc:  # Ctrl-C or SIGTERM: a complete checkpoint was written
            result = exc
        finally:
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
    if isinstance(result, TrainingInterrupted):  # its line comes last, after any warnings
        raise stop(str(result) if result.is_main else None, 130)  # one line per run, from rank 0
    if result.is_main:
        console.print(result.summary_table())


def _is_explicit(ctx: typer.Context, name: str) -> bool:
    """True when the option was given on the command line (or the environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP")
