"""dynasearch: weight-sharing architecture search for Diffusion Transformers."""

import signal as _signal
import sys as _sys
from pathlib import Path as _Path


def _interrupted_while_importing(_signum: int, _frame: object) -> None:
    """Ctrl-C while the `dynasearch` command is still importing: one line and exit code 130, no traceback."""
    print("interrupted", file=_sys.stderr)
    raise SystemExit(130)


def restore_sigint() -> None:
    """Put back the Ctrl-C handler found before the command's imports (the CLI calls this once it runs)."""
    global _previous_sigint
    if _previous_sigint is not None:
        _signal.signal(_signal.SIGINT, _previous_sigint)
        _previous_sigint = None


_AS_COMMAND = bool(_sys.argv) and (_Path(_sys.argv[0]).name == "dynasearch" or _sys.argv[0] == "-m")
_previous_sigint = None
if _AS_COMMAND:  # only the command itself: a library user's Ctrl-C during `import dynasearch` stays theirs
    try:
        _previous_sigint = _signal.signal(_signal.SIGINT, _interrupted_while_importing) or _signal.default_int_handler
    except ValueError:  # not the main thread
        _previous_sigint = None

from .checkpoint import load_checkpoint, load_pretrained, save_checkpoint, save_diffusers  # noqa: E402
from .cost.flops import closed_form_flops, count_flops, parse_budget  # noqa: E402
from .errors import (  # noqa: E402
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
from .model import DIT_CONFIGS, DiT, DiTConfig, create_supernet, get_config, model_names  # noqa: E402
from .model.schedule import SubnetSchedule, TimestepBuckets  # noqa: E402
from .model.subnet import BlockChoice, Subnet  # noqa: E402
from .slicing import reorder_by_importance, slice_subnet  # noqa: E402
from .space import SearchSpace, load_space  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "DIT_CONFIGS",
    "BlockChoice",
    "BudgetError",
    "CheckpointError",
    "ConfigError",
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
    "__version__",
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
    "save_diffusers",
    "slice_subnet",
]
