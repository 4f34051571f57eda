"""dynasearch: weight-sharing architecture search for Diffusion Transformers."""

from .checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from .cost.flops import closed_form_flops, count_flops, parse_budget
from .errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    DynasearchError,
    SearchError,
    SearchSpaceError,
    SubnetError,
    TrainingError,
)
from .model import DIT_CONFIGS, DiT, DiTConfig, create_supernet, get_config, model_names
from .model.schedule import SubnetSchedule, TimestepBuckets
from .model.subnet import BlockChoice, Subnet
from .space import SearchSpace, load_space
from .slicing import reorder_by_importance, slice_subnet
from .version import __version__

__all__ = [
    "__version__",
    "BlockChoice",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DIT_CONFIGS",
    "DataError",
    "DiT",
    "DiTConfig",
    "DynasearchError",
    "SearchError",
    "SearchSpace",
    "SearchSpaceError",
    "Subnet",
    "SubnetError",
    "SubnetSchedule",
    "TimestepBuckets",
    "TrainingError",
    "closed_form_flops",
    "count_flops",
    "create_supernet",
    "get_config",
    "load_checkpoint",
    "load_pretrained",
    "load_space",
    "model_names",
    "parse_budget",
    "reorder_by_importance",
    "save_checkpoint",
    "slice_subnet",
]
