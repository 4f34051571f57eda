"""`dynasearch train-supernet`: sandwich-rule supernet training (options -> TrainConfig -> train_supernet)."""

from __future__ import annotations

import shutil
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..checkpoint.native import CONFIG_NAME
from ..data import ACCEPTED as DATA_SPECS
from ..errors import DiskFullError, DynasearchError
from ..model.config import DIT_CONFIGS
from ..space import DEFAULT_SPACE
from ..train.compile import RECOMPILE_LIMIT
from ..train.config import (
    SUPERNET_RUN,
    RunKind,
    TrainConfig,
    TrainingWarning,
    load_run_config,
)
from ..train.dist import TrainingInterrupted
from ..train.loop import train_supernet
from ..train.presets import PRESETS
from ..train.result import TrainResult
from ..train.run_dir import STATE_NAME
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


class Precision(str, Enum):
    """--precision choices."""
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Logger(str, Enum):
    """--log choices."""
    csv = "csv"
    tensorboard = "tensorboard"


PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str)  # --preset choices


# The options every training command has (train-supernet, finetune): each one's help once, each command's default.
Steps = Annotated[int, typer.Option(help="Total optimiser steps (a resumed run continues to this step).")]
BatchSize = Annotated[int, typer.Option(help="Global batch size (split over DDP processes).")]
Lr = Annotated[float, typer.Option(help="Peak AdamW learning rate.")]
WarmupSteps = Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")]
Schedule = Annotated[LrSchedule, typer.Option(help="Learning rate after warm-up.")]
MinLrRatio = Annotated[float, typer.Option(help="Cosine schedule: final lr as a fraction of --lr.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
GradClip = Annotated[float, typer.Option(help="Max total gradient norm (0: no clipping).")]
DeviceChoice = Annotated[Device, typer.Option(help="auto: CUDA when available, else CPU.")]
CkptEvery = Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the run files in an existing --out.")]
LogEvery = Annotated[int, typer.Option(help="Append metrics (and print a line when not on a terminal) every N steps.")]
DistTimeout = Annotated[float, typer.Option(help="Seconds a DDP collective waits for a stuck rank.")]
PrecisionChoice = Annotated[Precision | None, typer.Option(
    help="Autocast precision (default: bf16 on CUDA, fp32 on the CPU); weights, optimiser and EMA stay float32. "
         "fp16 scales the loss (GradScaler): a step with inf/NaN gradients is skipped and counted in metrics.csv "
         "(skipped_steps). Kept by --resume.")]
Tf32 = Annotated[bool, typer.Option("--tf32/--no-tf32", help="TF32 float32 matmuls and convolutions on CUDA (no "
                                                             "effect on the CPU).")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile each DiT block's forward with automatic dynamic shapes (MLP width and token "
                      "count become symbolic; a graph per head count and per full/routed token path, shared by "
                      "every block; embedders, head, loss and optimiser stay eager; dynamo's recompile limit raised "
                      f"to {RECOMPILE_LIMIT}). Where compilation is unavailable or fails: one warning, and the run "
                      "trains without it.")]
GradCheckpoint = Annotated[bool, typer.Option(
    "--grad-checkpoint", help="Activation checkpointing per DiT block: keep only each block's input and recompute "
                              "its activations in the backward (less memory, ~1/3 more compute, equal gradients).")]
LogChoice = Annotated[Logger, typer.Option(
    help="csv: metrics.csv; tensorboard: metrics.csv and the same scalars as TensorBoard events in OUT/tensorboard "
         '(the optional extra: pip install -e ".[tensorboard]").')]
Preset = Annotated[PresetName | None, typer.Option(  # type: ignore[valid-type]
    help="DiT's fine-tuning recipe, dit-finetune: lr 1e-4 constant without warm-up, EMA 0.9999, weight decay 0, no "
         "gradient clipping, AdamW betas (0.9, 0.999); options given explicitly override it. config.json records "
         "it.")]

_DEF = TrainConfig()  # the library's defaults, shown in --help


@app.command("train-supernet")
def train_supernet_command(
    ctx: typer.Context,
    model: ModelName | None = typer.Option(
        None, help="Registry model (default DiT-T/2, or the architecture of --init-from)."
    ),
    data: str = typer.Option(
        _DEF.data, help=f"{DATA_SPECS} (folder: one sub-folder per class; npz: arrays x, y; latents: extract-latents "
                        "output)."
    ),
    image_size: int | None = typer.Option(None, help="Resize images to this side (default: the data's own size)."),
    space: str = typer.Option(
        DEFAULT_SPACE, help="Search space the supernet is trained on: a shipped name or a YAML file."
    ),
    steps: Steps = _DEF.steps,
    batch_size: BatchSize = _DEF.batch_size,
    lr: Lr = _DEF.lr,
    warmup_steps: WarmupSteps = _DEF.warmup_steps,
    lr_schedule: Schedule = LrSchedule(_DEF.lr_schedule),
    min_lr_ratio: MinLrRatio = _DEF.min_lr_ratio,
    weight_decay: WeightDecay = _DEF.weight_decay,
    grad_clip: GradClip = _DEF.grad_clip,
    sandwich: int = typer.Option(_DEF.sandwich, help="Random subnets per step besides the largest and smallest."),
    distill: float = typer.Option(_DEF.distill, help="In-place distillation weight (0 disables it)."),
    ema_decay: float = typer.Option(_DEF.ema_decay, help="EMA decay (with warm-up); 0.9999 for long runs."),
    seed: int = typer.Option(_DEF.seed, help="Seed of the initial weights and of every step's sampling."),
    device: DeviceChoice = Device(_DEF.device),
    out: Path = typer.Option(Path(_DEF.out), help="Run directory."),
    ckpt_every: CkptEvery = _DEF.ckpt_every,
    resume: Resume = False,
    overwrite: Overwrite = False,
    init_from: Path | None = typer.Option(
        None, help="Start from a dynasearch checkpoint directory or an original DiT .pt state dict."
    ),
    reorder: bool | None = typer.Option(
        None, "--reorder/--no-reorder", help="Re-order heads and channels by importance first (default: with "
                                             "--init-from)."
    ),
    log_every: LogEvery = _DEF.log_every,
    dist_timeout: DistTimeout = _DEF.dist_timeout,
    precision: PrecisionChoice = None,
    tf32: Tf32 = _DEF.tf32,
    compile: Compile = _DEF.compile,
    grad_checkpoint: GradCheckpoint = _DEF.grad_checkpoint,
    log: LogChoice = Logger(_DEF.log),
    preset: Preset = None,
) -> None:
    """Train a weight-sharing supernet with the sandwich rule (torchrun --nproc_per_node K -m dynasearch ... for DDP).
    """
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
        "precision": precision,
        "tf32": tf32,
        "compile": compile,
        "grad_checkpoint": grad_checkpoint,
        "log": log,
        "preset": preset,
    }
    run_training_command(ctx, given, SUPERNET_RUN, train_supernet)


def run_training_command(
    ctx: typer.Context, given: dict[str, Any], kind: RunKind[Any], train: Callable[..., TrainResult]
) -> None:
    """Build the run's arguments from the options (enums and paths as plain values; a --preset's values for the
    options left at their defaults; a --resume takes the stored run's for those), train, print warnings, then the
    summary -- or the resume hint and exit 130 after Ctrl-C."""
    given = {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v for k, v in given.items()}
    if given.get("preset") is not None:  # explicitly given options override the preset
        given.update({k: v for k, v in PRESETS[given["preset"]].items() if not _is_explicit(ctx, k)})
    cfg = kind.arguments(**given)
    out = Path(given["out"])
    if given["resume"] and (out / CONFIG_NAME).is_file() and (out / STATE_NAME).is_file():
        # Options left at their defaults take the stored run's values; explicitly given ones must agree with it.
        explicit = {k for k in given if _is_explicit(ctx, k)} | {"out", "resume"}
        cfg = load_run_config(out, kind).replace(**{k: v for k, v in given.items() if k in explicit}, overwrite=False)
    existed, failed = out.exists(), False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrainingWarning)
        try:
            result = train(cfg, progress=True)
        except TrainingInterrupted as exc:  # Ctrl-C or SIGTERM: a complete checkpoint was written
            result = exc
        except DiskFullError:  # a new run that never committed a checkpoint leaves nothing behind
            failed = True
            if not existed and not (out / STATE_NAME).exists():
                shutil.rmtree(out, ignore_errors=True)
            raise
        except DynasearchError:
            failed = True  # the error is the one line: no warnings before it
            raise
        finally:
            for w in caught if not failed else ():
                print(f"warning: {w.message}", file=sys.stderr)
    if isinstance(result, TrainingInterrupted):  # its line comes last, after any warnings
        raise stop(str(result) if result.is_main else None, 130)  # one line per run, from rank 0
    if result.is_main:
        console.print(result.summary_table())


def _is_explicit(ctx: typer.Context, name: str) -> bool:
    """True when the option was given on the command line (or the environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP")
