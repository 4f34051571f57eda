"""Fine-tuning arguments: :class:`FinetuneConfig` (validated, recorded in the output's config.json) and the kind of
run directory `dynasearch finetune` writes (:data:`FINETUNE_RUN`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.native import WEIGHT_NAMES
from ..errors import TrainingError
from .config import RESUMABLE, ArgsDataclass, RunKind, check_ints, check_numbers, check_run_args, fspath_fields

__all__ = ["DEFAULT_DISTILL_WEIGHT", "FINETUNE_RUN", "FinetuneConfig"]

DEFAULT_DISTILL_WEIGHT = 0.5
"""The distillation weight when --teacher is given without --distill-weight."""


_DISTILL_RULE = {"distill_weight": (lambda v: 0 <= v <= 1, "in [0, 1] (0 disables distillation)")}


@dataclass(frozen=True)
class FinetuneConfig(ArgsDataclass):
    """Every argument of a fine-tuning run of an exported subnet (recorded in the output's config.json).

    The objective is ``(1 - w) * diffusion loss + w * MSE(epsilon, teacher's full-width epsilon)`` with
    ``w = distill_weight``, on the data the subnet's supernet was trained on; the recipe is the supernet's (AdamW
    at its peak learning rate, linear warm-up, cosine decay to ``min_lr_ratio * lr``, gradient clipping, EMA with
    warm-up). Measured on the digits (the demo's 600-step DiT-T/2 supernet, its searched 0.5x subnet, 300 steps,
    FD of 1,000 samples, seeds 0/1): inherited 35.3/35.6; lr 3e-3 27.1/27.6 without distillation, 28.9/29.4 with
    w = 0.5; lr 1e-3 27.2/28.0 and 29.2/30.4. So distillation is off unless asked for (--teacher or
    --distill-weight). A pretrained DiT's subnet takes DiT's recipe instead: ``--preset dit-finetune``
    (:meth:`from_preset`: lr 1e-4 constant, EMA 0.9999, no weight decay, no clipping).
    """

    checkpoint: str | None = None  # the exported (sliced) checkpoint; None with --resume: as stored
    teacher: str | None = None  # supernet run / checkpoint directory or DiT .pt; None: the one the export names
    distill_weight: float | None = None  # None: DEFAULT_DISTILL_WEIGHT with --teacher, else 0 (no distillation)
    steps: int = 300  # total optimiser steps (a resumed run continues to this step)
    batch_size: int = 64  # global batch (split evenly over DDP ranks)
    lr: float = 3e-3  # peak AdamW learning rate (3e-4 and 1e-3 did worse in 300 steps, see above)
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # constant | cosine (down to min_lr_ratio * lr at `steps`)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max total gradient norm; 0 disables clipping
    ema_decay: float = 0.999
    seed: int = 0  # seeds every step's batch, timesteps, noise and label dropout
    device: str = "auto"  # auto | cpu | cuda
    out: str = "runs/finetune"
    ckpt_every: int = 100
    resume: bool = False
    overwrite: bool = False
    log_every: int = 25
    dist_timeout: float = 600.0
    precision: str | None = None  # fp32 | bf16 | fp16; None: bf16 on CUDA, else fp32 (a resume: as stored)
    tf32: bool = True  # TF32 float32 matmuls and convolutions on CUDA
    compile: bool = False  # torch.compile each block (see dynasearch.train.compile)
    grad_checkpoint: bool = False  # per-block activation checkpointing
    log: str = "csv"  # csv | tensorboard (metrics.csv and OUT/tensorboard events)
    preset: str | None = None  # a named set of hyper-parameters (dynasearch.train.presets)

    def __post_init__(self) -> None:
        fspath_fields(self, ("checkpoint", "teacher", "out"))
        if self.checkpoint is None and not self.resume:
            raise TrainingError(
                "--checkpoint is required: the exported subnet to fine-tune (e.g. results/X/subnets/best)"
            )
        check_ints(self, {"steps": 1, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "warmup_steps": 0})
        check_numbers(self, ("lr", "weight_decay", "grad_clip", "ema_decay", "min_lr_ratio", "dist_timeout"))
        if self.distill_weight is not None:
            check_numbers(self, ("distill_weight",), _DISTILL_RULE)
        check_run_args(self)


FINETUNE_RUN: RunKind[FinetuneConfig] = RunKind(
    command="finetune",
    section="finetune",
    arguments=FinetuneConfig,
    weights=WEIGHT_NAMES[0],  # model.safetensors: the output is a sliced checkpoint like any export
    resumable=RESUMABLE,  # as a supernet run's: steps, cadence, device
    as_stored=("checkpoint", "teacher", "distill_weight", "precision"),
    what="fine-tuning run",
)
"""A `dynasearch finetune` output directory: a sliced checkpoint (EMA weights) plus the run's files."""
