"""Search: `run_search` (static or timestep-aware, decided by the space), the study, workers, proxy, storage, outputs."""

from .outputs import SearchResult
from .proxy import ProxyEvaluator, ProxySet, build_proxy_set
from .run import run_search
from .study import (
    SAMPLERS,
    SearchConfig,
    SearchContext,
    SearchInterrupted,
    prepare_search,
)
from .timestep import TimestepSearchResult, TimestepSettings, run_timestep_search

__all__ = [
    "SAMPLERS",
    "ProxyEvaluator",
    "ProxySet",
    "SearchConfig",
    "SearchContext",
    "SearchInterrupted",
    "SearchResult",
    "TimestepSearchResult",
    "TimestepSettings",
    "build_proxy_set",
    "prepare_search",
    "run_search",
    "run_timestep_search",
]
