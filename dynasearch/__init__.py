"""dynasearch: weight-sharing architecture search for Diffusion Transformers."""

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
    "SearchSpaceError",
    "Subnet",
    "SubnetError",
    "TrainingError",
    "create_supernet",
    "get_config",
    "model_names",
]
