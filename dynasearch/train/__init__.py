"""Supernet training: arguments (config), the sandwich-rule step (sandwich), the loop (loop), what it trains (build),
the run directory (run_dir), several processes and signals (dist), step metrics (metrics), the live display
(progress), the run's result (result) and the EMA (ema); fine-tuning an exported subnet in the same loop (finetune,
its arguments finetune_config, what it trains finetune_source)."""

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
from .finetune import FinetuneResult, finetune_step  # finetune() itself: dynasearch.train.finetune.finetune
from .finetune_config import FinetuneConfig
from .loop import train_supernet
from .metrics import METRIC_COLUMNS, SubnetLoss, subnets_digest
from .result import TrainResult
from .run_dir import PENDING_DIR, RUN_FILES, recover_run_dir
from .sandwich import TrainBatch, draw_batch, sandwich_step, sandwich_subnets, step_seed

__all__ = [
    "DATA_SPLIT_SEED",
    "DEFAULT_MODEL",
    "EMA",
    "METRIC_COLUMNS",
    "PENDING_DIR",
    "RUN_FILES",
    "FinetuneConfig",
    "FinetuneResult",
    "SubnetLoss",
    "TrainBatch",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingWarning",
    "draw_batch",
    "finetune_step",
    "learning_rate",
    "load_run_config",
    "recover_run_dir",
    "sandwich_step",
    "sandwich_subnets",
    "step_seed",
    "subnets_digest",
    "train_supernet",
]
