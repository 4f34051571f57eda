"""`dynasearch finetune`: fine-tune an exported subnet (options -> FinetuneConfig -> finetune)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..train.finetune import finetune
from ..train.finetune_config import DEFAULT_DISTILL_WEIGHT, FINETUNE_RUN, FinetuneConfig
from ._app import app
from ._train import (
    BatchSize,
    CkptEvery,
    Compile,
    Device,
    DeviceChoice,
    DistTimeout,
    GradCheckpoint,
    GradClip,
    LogChoice,
    LogEvery,
    Logger,
    Lr,
    LrSchedule,
    MinLrRatio,
    Overwrite,
    PrecisionChoice,
    Preset,
    Resume,
    Schedule,
    Steps,
    Tf32,
    WarmupSteps,
    WeightDecay,
    run_training_command,
)

_FT = FinetuneConfig(checkpoint="")  # the library's defaults, shown in --help


@app.command("finetune")
def finetune_command(
    ctx: typer.Context,
    checkpoint: Path | None = typer.Option(
        None, help="Exported subnet to fine-tune: a search's subnets/NAME or schedules/NAME (not needed with --resume)."
    ),
    teacher: Path | None = typer.Option(
        None, help="Supernet to distil from (run directory, checkpoint or DiT .pt); with --distill-weight alone: the "
                   "one the export names."
    ),
    distill_weight: float | None = typer.Option(
        None, help=f"w in (1-w) diffusion loss + w MSE to the teacher, in [0, 1] (default {DEFAULT_DISTILL_WEIGHT:g} "
                   "with --teacher, else 0: no distillation)."
    ),
    steps: Steps = _FT.steps,
    batch_size: BatchSize = _FT.batch_size,
    lr: Lr = _FT.lr,
    warmup_steps: WarmupSteps = _FT.warmup_steps,
    lr_schedule: Schedule = LrSchedule(_FT.lr_schedule),
    min_lr_ratio: MinLrRatio = _FT.min_lr_ratio,
    weight_decay: WeightDecay = _FT.weight_decay,
    grad_clip: GradClip = _FT.grad_clip,
    ema_decay: float = typer.Option(_FT.ema_decay, help="EMA decay (with warm-up) of the weights written."),
    seed: int = typer.Option(_FT.seed, help="Seed of every step's batch, timesteps, noise and label dropout."),
    device: DeviceChoice = Device(_FT.device),
    out: Path = typer.Option(..., help="Output: a sliced checkpoint (EMA weights) and the run's files."),
    ckpt_every: CkptEvery = _FT.ckpt_every,
    resume: Resume = False,
    overwrite: Overwrite = False,
    log_every: LogEvery = _FT.log_every,
    dist_timeout: DistTimeout = _FT.dist_timeout,
    precision: PrecisionChoice = None,
    tf32: Tf32 = _FT.tf32,
    compile: Compile = _FT.compile,
    grad_checkpoint: GradCheckpoint = _FT.grad_checkpoint,
    log: LogChoice = Logger(_FT.log),
    preset: Preset = None,
) -> None:
    """Fine-tune every weight of an exported subnet on its supernet's data, optionally distilling the supernet."""
    options = {k: v for k, v in locals().items() if k != "ctx"}  # every option, named as FinetuneConfig's fields
    run_training_command(ctx, options, FINETUNE_RUN, finetune)
