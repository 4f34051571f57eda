"""dynasearch: weight-sharing architecture search for Diffusion Transformers."""

from .checkpoint import load_checkpoint, save_checkpoint
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
from .flops import closed_form_flops, count_flops, parse_budget
from .model import DIT_CONFIGS, DiT, DiTConfig, create_supernet, get_config, model_names
from .searchspace import SearchSpace, load_space
from .slicing import reorder_by_importance, slice_subnet
from .space import BlockChoice, Subnet

__version__ = "0.1.0"

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
    "TrainingError",
    "closed_form_flops",
    "count_flops",
    "create_supernet",
    "get_config",
    "load_checkpoint",
    "load_space",
    "model_names",
    "parse_budget",
    "reorder_by_importance",
    "save_checkpoint",
    "slice_subnet",
]
