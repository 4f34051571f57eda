"""One exception hierarchy for every failure a user can cause.

The CLI turns any :class:`DynasearchError` into one line on stderr and exit code 2;
anything else is an internal error (exit code 1).
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "DynasearchError",
    "SearchError",
    "SearchSpaceError",
    "SubnetError",
    "TrainingError",
]


class DynasearchError(Exception):
    """Base class: a problem with the user's input, reported as one clear line."""


class ConfigError(DynasearchError):
    """An unknown model name or an invalid model configuration."""


class SubnetError(DynasearchError):
    """A subnet that does not fit the model it is applied to."""


class BudgetError(DynasearchError):
    """A FLOPs budget string that cannot be parsed or cannot be met."""


class CheckpointError(DynasearchError):
    """A checkpoint that is missing, corrupt, unsafe or from another model."""


class DataError(DynasearchError):
    """A dataset that is missing, empty or inconsistent."""


class SearchSpaceError(DynasearchError):
    """A search-space file with an invalid field."""


class TrainingError(DynasearchError):
    """Training that cannot start or cannot go on (existing run dir, NaN loss, ...)."""


class SearchError(DynasearchError):
    """A search that cannot start or cannot go on."""


class DiskFullError(DynasearchError):
    """A write that found the file system full (what was there before is left as it was)."""
