"""Search spaces: the per-block choices the supernet is trained on (sandwich rule) and the search explores.

A decision *group* is a set of blocks sharing one choice per dimension: the whole model (global), one stage, or
one block. Rates are fractions of the full supernet's widths (see :func:`dynasearch.model.subnet.rate_to_heads`);
rates that round to the same head or channel count are allowed and counted once by :meth:`SearchSpace.size`. With
``timestep_buckets`` every timestep range takes its own choices (:mod:`dynasearch.model.schedule`); the methods
below describe the space of one bucket. Spaces are YAML files (:mod:`dynasearch.space.parse`); the shipped
ones (``uniform``, ``stagewise``, ``blockwise``, ``timestep``) are package data in ``dynasearch/search_spaces/`` and
load by name.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SearchSpaceError, SubnetError
from ..model.rates import rate_to_heads, rate_to_mlp_hidden
from ..model.schedule import TimestepBuckets
from ..model.subnet import Subnet
from .parse import (
    DIMENSIONS,
    GRANULARITIES,
    NO_FILE,
    bucket_spec,
    check_mapping,
    choice_list,
    format_choices,
    positive_int,
    read_yaml,
    same_choice,
    space_error,
)

if TYPE_CHECKING:
    from ..model.config import DiTConfig

__all__ = ["DEFAULT_SPACE", "GRANULARITIES", "SearchSpace", "load_space", "shipped_spaces"]

DEFAULT_SPACE = "blockwise"
"""The space the supernet is trained on unless told otherwise."""


@dataclass(frozen=True)
class SearchSpace:
    """Choices per decision group for heads, MLP width and token ratio; validated and normalised on creation."""

    name: str
    granularity: str
    attn_rate: tuple[float, ...]
    mlp_rate: tuple[float, ...]
    token_ratio: tuple[float, ...]
    stages: int | None = None
    stage_sizes: tuple[int, ...] | None = None
    timestep_buckets: int | tuple[int, ...] | None = None
    source: str = field(default=NO_FILE, compare=False)

    def __post_init__(self) -> None:
        label = self.label
        if not isinstance(self.name, str) or not self.name.strip():
            raise space_error(label, f"name must be a non-empty string, got {self.name!r}")
        if self.granularity not in GRANULARITIES:
            choices = ", ".join(GRANULARITIES)
            raise space_error(label, f"granularity has value {self.granularity!r}; choose one of: {choices}")
        for key in DIMENSIONS:
            object.__setattr__(self, key, choice_list(label, key, getattr(self, key)))
        if self.granularity != "stage":
            for key in ("stages", "stage_sizes"):
                if getattr(self, key) is not None:
                    raise space_error(
                        label, f"{key} is only allowed with granularity 'stage', not {self.granularity!r}"
                    )
        elif (self.stages is None) == (self.stage_sizes is None):
            raise space_error(
                label, "granularity 'stage' needs exactly one of stages (a count) or stage_sizes (a list)"
            )
        elif self.stages is not None:
            positive_int(label, "stages", self.stages)
        else:
            sizes = self.stage_sizes
            if not isinstance(sizes, (list, tuple)) or not sizes:
                raise space_error(label, f"stage_sizes must be a non-empty list of positive integers, got {sizes!r}")
            object.__setattr__(self, "stage_sizes", tuple(positive_int(label, "stage_sizes", s) for s in sizes))
        if self.timestep_buckets is not None:
            object.__setattr__(self, "timestep_buckets", bucket_spec(label, self.timestep_buckets))

    @property
    def label(self) -> str:
        """How messages name this space: its file, its name if shipped, or its name when built from a dict."""
        if self.source != NO_FILE:
            path = Path(self.source)
            return path.stem if str(path.parent) == str(_shipped_dir()) else self.source
        return self.name if isinstance(self.name, str) and self.name else NO_FILE

    # --- structure ----------------------------------------------------------------------------------------------
    @property
    def timestep_aware(self) -> bool:
        """True when each timestep bucket takes its own choices."""
        return self.timestep_buckets is not None

    def buckets(self, num_timesteps: int = 1000) -> TimestepBuckets:
        """The timestep buckets over [0, num_timesteps) (one bucket for a static space)."""
        try:
            return TimestepBuckets.from_spec(self.timestep_buckets or 1, num_timesteps)
        except SubnetError as exc:
            raise space_error(self.label, str(exc)) from None

    def groups(self, config: DiTConfig) -> list[list[int]]:
        """Block indices of each decision group of `config`, in block order."""
        depth = config.depth
        if self.granularity == "global":
            return [list(range(depth))]
        if self.granularity == "block":
            return [[i] for i in range(depth)]
        if self.stage_sizes is not None:
            if sum(self.stage_sizes) != depth:
                raise space_error(
                    self.label,
                    f"stage_sizes {list(self.stage_sizes)} sum to {sum(self.stage_sizes)} "
                    f"but model '{config.name}' has {depth} blocks",
                )
            sizes = list(self.stage_sizes)
        else:
            assert self.stages is not None
            if self.stages > depth:
                raise space_error(
                    self.label, f"stages is {self.stages} but model '{config.name}' has only {depth} blocks"
                )
            base, extra = divmod(depth, self.stages)
            sizes = [base + (1 if i < extra else 0) for i in range(self.stages)]
        out, start = [], 0
        for size in sizes:
            out.append(list(range(start, start + size)))
            start += size
        return out

    def validate_for(self, config: DiTConfig) -> None:
        """Raise SearchSpaceError if this space cannot be applied to `config` (groups, token selection)."""
        self.groups(config)
        below_one = [r for r in self.token_ratio if r < 1.0]
        if below_one and not config.token_selection:
            raise space_error(
                self.label,
                f"token_ratio {format_choices(below_one)} needs token selection, which model '{config.name}' lacks",
            )

    def _checked_groups(self, config: DiTConfig) -> list[list[int]]:
        """Validate against `config` and return its groups."""
        self.validate_for(config)
        return self.groups(config)

    def num_decisions(self, config: DiTConfig) -> int:
        """Number of (group, dimension) decisions: 3 per group, even where a dimension has a single choice."""
        return len(self._checked_groups(config)) * len(DIMENSIONS)

    def size(self, config: DiTConfig) -> int:
        """Number of distinct subnets of `config` in this space (rates that round to the same width count once)."""
        mappers: dict[str, Callable[[float, int], object]] = {
            "attn_rate": lambda r, b: rate_to_heads(config, r, b),
            "mlp_rate": lambda r, b: rate_to_mlp_hidden(config, r, b),
            "token_ratio": lambda r, b: r,
        }
        total = 1
        for blocks in self._checked_groups(config):
            for key, mapper in mappers.items():
                total *= len({tuple(mapper(r, b) for b in blocks) for r in getattr(self, key)})
        return total

    # --- subnets ------------------------------------------------------------------------------------------------
    def subnet(
        self, config: DiTConfig, attn: Sequence[float], mlp: Sequence[float], tokens: Sequence[float]
    ) -> Subnet:
        """The subnet with one choice per group per dimension (each must be one of this space's choices)."""
        groups = self._checked_groups(config)
        rates: dict[str, list[float]] = {}
        for key, values in zip(DIMENSIONS, (attn, mlp, tokens), strict=True):
            values = list(values)
            if len(values) != len(groups):
                raise space_error(
                    self.label,
                    f"{key} has {len(values)} entries but the space has {len(groups)} decision groups "
                    f"for model '{config.name}'",
                )
            allowed = getattr(self, key)
            per_block = [0.0] * config.depth
            for g, (blocks, value) in enumerate(zip(groups, values, strict=True)):
                match = None
                if not isinstance(value, bool) and isinstance(value, (int, float)):
                    match = next((a for a in allowed if same_choice(float(value), a)), None)
                if match is None:
                    raise space_error(
                        self.label, f"{key} {value!r} (group {g}) is not one of the choices ({format_choices(allowed)})"
                    )
                for b in blocks:
                    per_block[b] = match
            rates[key] = per_block
        return Subnet.from_rates(config, rates["attn_rate"], rates["mlp_rate"], rates["token_ratio"])

    def uniform(self, config: DiTConfig, attn: float, mlp: float, tokens: float) -> Subnet:
        """The subnet with the same choice in every group."""
        n = len(self._checked_groups(config))
        return self.subnet(config, [attn] * n, [mlp] * n, [tokens] * n)

    def uniform_subnets(self, config: DiTConfig) -> list[tuple[tuple[float, float, float], Subnet]]:
        """Every distinct uniform subnet, with the (attn, mlp, token) rates that first give it (rates that round
        to the same widths give one subnet)."""
        out: dict[Subnet, tuple[float, float, float]] = {}
        for a in self.attn_rate:
            for m in self.mlp_rate:
                for r in self.token_ratio:
                    out.setdefault(self.uniform(config, a, m, r), (a, m, r))
        return [(rates, subnet) for subnet, rates in out.items()]

    def largest(self, config: DiTConfig) -> Subnet:
        """The biggest subnet: the largest value of every choice."""
        return self.uniform(config, self.attn_rate[-1], self.mlp_rate[-1], self.token_ratio[-1])

    def smallest(self, config: DiTConfig) -> Subnet:
        """The smallest subnet: the smallest value of every choice."""
        return self.uniform(config, self.attn_rate[0], self.mlp_rate[0], self.token_ratio[0])

    def sample_rates(
        self, config: DiTConfig, rng: random.Random
    ) -> tuple[list[float], list[float], list[float]]:
        """Uniform random per-group rates (attn, mlp, tokens), drawn dimension by dimension, group by group."""
        n = len(self._checked_groups(config))
        attn, mlp, tokens = ([rng.choice(getattr(self, key)) for _ in range(n)] for key in DIMENSIONS)
        return attn, mlp, tokens

    def sample(self, config: DiTConfig, rng: random.Random) -> Subnet:
        """A uniform random subnet; deterministic given the state of `rng`."""
        return self.subnet(config, *self.sample_rates(config, rng))

    def contains(self, config: DiTConfig, subnet: Subnet) -> bool:
        """True if this space can produce `subnet` for `config` (every group takes one of its choices)."""
        groups = self._checked_groups(config)
        if not isinstance(subnet, Subnet) or subnet.depth != config.depth:
            return False
        blocks_of = subnet.blocks
        for blocks in groups:
            if not any(all(rate_to_heads(config, r, b) == blocks_of[b].heads for b in blocks) for r in self.attn_rate):
                return False
            if not any(all(rate_to_mlp_hidden(config, r, b) == blocks_of[b].mlp_hidden for b in blocks)
                       for r in self.mlp_rate):
                return False
            if not any(all(same_choice(r, blocks_of[b].token_ratio) for b in blocks) for r in self.token_ratio):
                return False
        return True

    def check_trained_on(self, other: SearchSpace) -> None:
        """Raise SearchSpaceError if this space has a choice value that `other` (the training space) lacks."""
        for key in DIMENSIONS:
            trained = getattr(other, key)
            missing = [v for v in getattr(self, key) if not any(same_choice(v, t) for t in trained)]
            if missing:
                verb = "was" if len(missing) == 1 else "were"
                raise space_error(
                    self.label,
                    f"{key} {format_choices(missing)} {verb} not in the supernet's training space '{other.name}' "
                    f"({format_choices(trained)})",
                )

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (without the source path), accepted by :meth:`from_dict`."""
        out: dict[str, Any] = {"name": self.name, "granularity": self.granularity}
        if self.stages is not None:
            out["stages"] = self.stages
        if self.stage_sizes is not None:
            out["stage_sizes"] = list(self.stage_sizes)
        out.update({key: list(getattr(self, key)) for key in DIMENSIONS})
        if self.timestep_buckets is not None:
            tb = self.timestep_buckets
            out["timestep_buckets"] = tb if isinstance(tb, int) else list(tb)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = NO_FILE) -> SearchSpace:
        """Build and validate a space from its mapping form; `source` names it in messages."""
        check_mapping(data, source)
        name = data.get("name")
        if name is None:
            name = Path(source).stem if source != NO_FILE else "custom"
        return cls(
            name=name,
            granularity=data["granularity"],
            attn_rate=data["attn_rate"],
            mlp_rate=data["mlp_rate"],
            token_ratio=data["token_ratio"],
            stages=data.get("stages"),
            stage_sizes=data.get("stage_sizes"),
            timestep_buckets=data.get("timestep_buckets"),
            source=source,
        )

    def describe(self) -> str:
        """One-line summary, e.g. 'blockwise (block): attn_rate 0.25/0.5/0.75/1.0, ...'."""
        how = self.granularity
        if self.stages is not None:
            how = f"{self.stages} stages"
        elif self.stage_sizes is not None:
            how = f"stages of {'/'.join(str(s) for s in self.stage_sizes)} blocks"
        dims = ", ".join(f"{key} {'/'.join(str(v) for v in getattr(self, key))}" for key in DIMENSIONS)
        tb = self.timestep_buckets
        if tb is not None:
            how += (f", {tb} timestep buckets" if isinstance(tb, int)
                    else f", timestep buckets at {'/'.join(map(str, tb))}")
        return f"{self.name} ({how}): {dims}"



def _shipped_dir() -> Any:
    """The package directory holding the shipped YAML files (a Traversable)."""
    return resources.files("dynasearch") / "search_spaces"


def shipped_spaces() -> list[str]:
    """Names of the search spaces shipped with the package, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _shipped_dir().iterdir() if p.name.endswith(".yaml"))


def _parse(text: str, source: str) -> SearchSpace:
    """Parse YAML text into a validated space."""
    return SearchSpace.from_dict(read_yaml(text, source), source=source)


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Load a YAML search space from a path, or a shipped one by name (a bare shipped name wins over a path)."""
    if isinstance(path_or_name, str) and path_or_name in shipped_spaces():
        resource = _shipped_dir() / f"{path_or_name}.yaml"
        return _parse(resource.read_text(encoding="utf-8"), str(resource))
    path = Path(path_or_name)
    if not path.exists():
        raise SearchSpaceError(
            f"search space file '{path}' does not exist (shipped spaces: {', '.join(shipped_spaces())})"
        )
    if not path.is_file():
        raise SearchSpaceError(f"search space file '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchSpaceError(f"search space file '{path}' cannot be read: {exc}") from None
    return _parse(text, str(path))
