"""Search: `run_search` (static or timestep-aware, decided by the space), the study, workers, proxy, storage,
outputs."""

from .config import SAMPLERS, SearchConfig, TimestepSettings, is_timestep_space
from .context import SearchContext, prepare_search
from .objective import make_objective
from .outputs import SearchResult
from .proxy import PROXY_KINDS, ProxyEvaluator, ProxySet, build_proxy_set
from .run import run_search, run_static_search
from .timestep import TimestepSearchResult, run_timestep_search
from .trials import SearchInterrupted

__all__ = [
    "PROXY_KINDS",
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
    "is_timestep_space",
    "make_objective",
    "prepare_search",
    "run_search",
    "run_static_search",
    "run_timestep_search",
]
