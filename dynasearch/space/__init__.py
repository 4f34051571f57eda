"""Search spaces: which per-block rates the supernet trains and the search explores (YAML files, shipped or yours)."""

from .search_space import DEFAULT_SPACE, GRANULARITIES, SearchSpace, load_space, shipped_spaces

__all__ = ["DEFAULT_SPACE", "GRANULARITIES", "SearchSpace", "load_space", "shipped_spaces"]
