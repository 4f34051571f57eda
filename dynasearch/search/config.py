"""What a search is asked to do: its typed config (one value per `dynasearch search` option) and which search that is.

The space decides the search: one with ``timestep_buckets`` (given, or the supernet's training space) runs the
timestep-aware search, with the settings of :class:`TimestepSettings`; any other space runs the static search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.native import read_config
from ..checks import check_memory, check_seed, check_workers
from ..cost.latency_table import parse_latency
from ..errors import SearchError
from ..space import SearchSpace, load_space
from .proxy import DEFAULT_PROXY, SAMPLE_STEPS, check_proxy_kind

__all__ = [
    "SAMPLERS",
    "SearchConfig",
    "TimestepSettings",
    "is_timestep_space",
    "training_space",
]

SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass(frozen=True)
class TimestepSettings:
    """What a timestep-aware search adds to a SearchConfig: the sampler run its FLOPs are averaged over.

    A static search ignores them; the timestep-aware search checks them (:meth:`check`) before anything else.
    """

    sample_steps: int = 50
    reference: Path | None = None  # a static subnet (or a static search's best.json) to compare against

    def check(self) -> None:
        """Raise SearchError when `sample_steps` is not a positive integer."""
        if isinstance(self.sample_steps, bool) or not isinstance(self.sample_steps, int) or self.sample_steps < 1:
            raise SearchError(f"--sample-steps must be a positive integer, got {self.sample_steps!r}")


@dataclass(frozen=True)
class SearchConfig:
    """Everything `dynasearch search` needs; one value per CLI option (the timestep-aware ones in `timestep`)."""

    supernet: Path
    flops: str | None  # None: no FLOPs budget (then --latency is required)
    out: Path
    space: str | None = None
    trials: int = 200
    sampler: str = "tpe"
    storage: str | None = None
    study_name: str = "dynasearch"
    workers: int = 1
    seed: int = 0
    export_top: int = 3
    proxy_samples: int = 512
    proxy: str = DEFAULT_PROXY  # the quality proxy's kind (dynasearch.search.proxy.PROXY_KINDS)
    device: str = "cpu"
    latency: str | None = None  # a latency budget (40ms, 0.04s, 40) on --latency-table's prediction
    latency_table: Path | None = None
    timestep: TimestepSettings = field(default_factory=TimestepSettings)

    def __post_init__(self) -> None:
        for key in ("supernet", "out"):  # library callers may pass strings
            object.__setattr__(self, key, Path(getattr(self, key)))
        if self.sampler not in SAMPLERS:
            raise SearchError(f"--sampler must be one of {', '.join(SAMPLERS)}, got '{self.sampler}'")
        for key in ("trials", "workers", "proxy_samples"):
            if getattr(self, key) < 1:
                raise SearchError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        check_proxy_kind(self.proxy)
        if self.proxy == "teacher-sample" and self.proxy_samples < SAMPLE_STEPS:
            raise SearchError(f"--proxy teacher-sample needs --proxy-samples of at least {SAMPLE_STEPS} "
                              f"({SAMPLE_STEPS} forwards per trajectory), got {self.proxy_samples}")
        if self.export_top < 0:
            raise SearchError(f"--export-top must be 0 or more, got {self.export_top}")
        check_latency_options(self)
        check_seed(self.seed, "--seed", SearchError)
        check_workers(self.workers, "--workers", SearchError)
        check_storage(self.storage, self.out)
        check_memory(self.proxy_samples * PROXY_BYTES_PER_SAMPLE, f"--proxy-samples {self.proxy_samples}", SearchError)


def check_latency_options(config: SearchConfig) -> None:
    """Raise SearchError (BudgetError for the budget itself) unless a budget is given and --latency comes with
    --latency-table."""
    if config.latency_table is not None:
        object.__setattr__(config, "latency_table", Path(config.latency_table))
    if config.flops is None and config.latency is None:
        raise SearchError("give a budget: --flops, --latency (with --latency-table), or both")
    if (config.latency is None) != (config.latency_table is None):
        given, missing = (("--latency", "--latency-table") if config.latency is not None
                          else ("--latency-table", "--latency"))
        raise SearchError(f"{given} needs {missing}")
    if config.latency is not None:
        parse_latency(config.latency)


PROXY_BYTES_PER_SAMPLE = 8 + 3 * 4 * 8 * 8
"""A lower bound of what one proxy quadruple holds (an int64 timestep; x0, noise and x_t in float32 at the smallest
input, 8x8x1): a --proxy-samples whose set alone cannot fit is refused before anything is loaded."""


def check_storage(storage: str | None, out: Path) -> None:
    """Raise SearchError when a journal-file storage (a path, not an RDB URL) names a directory or a path under a
    file, or --out is a file: checked before the output directory is created."""
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out '{out}' is a file, not a directory")
    if storage is None or "://" in storage:
        return
    path = Path(storage)
    if path.is_dir():
        raise SearchError(f"--storage '{storage}' is a directory; a journal storage is a file path (or an RDB URL)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SearchError(f"--storage '{storage}' cannot be created: '{parent}' is a file, not a directory")


def training_space(supernet: Path, doc: dict[str, Any]) -> SearchSpace | None:
    """The space a supernet was trained on, from its config.json `doc` (None when it records none)."""
    return SearchSpace.from_dict(doc["space"], source=f"{supernet}/config.json") if doc.get("space") else None


def is_timestep_space(config: SearchConfig) -> bool:
    """True when the space `config` searches (given, or the supernet's training space) has timestep buckets."""
    if config.space is not None:
        return load_space(config.space).timestep_aware
    space = training_space(config.supernet, read_config(config.supernet))
    return space is not None and space.timestep_aware
