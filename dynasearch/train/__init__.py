"""Supernet training: config, the sandwich-rule step, the loop, run directory, distributed helpers, EMA, progress."""

from .config import (
    DATA_SPLIT_SEED,
    DEFAULT_MODEL,
    TrainConfig,
    TrainingWarning,
    learning_rate,
    load_run_config,
)
from .dist import TrainingInterrupted
from .ema import EMA
from .loop import train_supernet
from .progress import SubnetLoss, TrainResult, subnets_digest
from .run_dir import recover_run_dir
from .sandwich import TrainBatch, draw_batch, sandwich_step, sandwich_subnets, step_seed

__all__ = [
    "DATA_SPLIT_SEED",
    "DEFAULT_MODEL",
    "EMA",
    "SubnetLoss",
    "TrainBatch",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingWarning",
    "draw_batch",
    "learning_rate",
    "load_run_config",
    "recover_run_dir",
    "sandwich_step",
    "sandwich_subnets",
    "step_seed",
    "subnets_digest",
    "train_supernet",
]
