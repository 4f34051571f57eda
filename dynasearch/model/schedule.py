"""Timestep-aware subnets: one subnet per range of diffusion timesteps, switched by the sampler at every step.

A :class:`TimestepBuckets` splits the timesteps [0, T) into K contiguous ranges; a :class:`SubnetSchedule` gives
each range its own :class:`~dynasearch.model.subnet.Subnet`. The cost of a schedule is the mean FLOPs per
denoising step of a given sampler run (its timesteps, e.g. 50 DDIM steps), so a budget means the same as for a
static subnet.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SubnetError
from ..fileio import atomic_write_text
from .subnet import BlockChoice, Subnet, read_subnet_json

if TYPE_CHECKING:
    from .config import DiTConfig

__all__ = ["SubnetSchedule", "TimestepBuckets", "is_schedule_doc", "load_subnet_or_schedule"]


@dataclass(frozen=True)
class TimestepBuckets:
    """Contiguous timestep ranges: bucket k holds boundaries[k] <= t < boundaries[k + 1], from 0 up to T."""

    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.boundaries
        if not isinstance(b, (tuple, list)) or len(b) < 2:
            raise SubnetError(f"timestep bucket boundaries must list at least 2 numbers (0 and T), got {b!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in b):
            raise SubnetError(f"timestep bucket boundaries must be integers, got {list(b)!r}")
        if b[0] != 0 or any(lo >= hi for lo, hi in itertools.pairwise(b)):
            raise SubnetError(f"timestep bucket boundaries must start at 0 and increase strictly, got {list(b)!r}")
        object.__setattr__(self, "boundaries", tuple(b))

    @classmethod
    def equal(cls, k: int, num_timesteps: int = 1000) -> TimestepBuckets:
        """K ranges of (nearly) equal length; the earlier ranges get the extra timesteps."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_timesteps:
            raise SubnetError(f"timestep_buckets must be an integer in [1, {num_timesteps}], got {k!r}")
        base, extra = divmod(num_timesteps, k)
        edges = [0]
        for i in range(k):
            edges.append(edges[-1] + base + (1 if i < extra else 0))
        return cls(tuple(edges))

    @classmethod
    def from_spec(cls, spec: int | Sequence[int], num_timesteps: int = 1000) -> TimestepBuckets:
        """From a search space's `timestep_buckets`: a count K, or inner boundaries such as [250, 500, 750]."""
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls.equal(spec, num_timesteps)
        inner = list(spec)
        if inner and inner[0] == 0:
            inner = inner[1:]
        if inner and inner[-1] == num_timesteps:
            inner = inner[:-1]
        bad = [v for v in inner if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < num_timesteps]
        if bad:
            raise SubnetError(f"timestep bucket boundary {bad[0]!r} is not an integer in (0, {num_timesteps})")
        return cls((0, *inner, num_timesteps))

    @property
    def num_timesteps(self) -> int:
        """T, the end of the last range."""
        return self.boundaries[-1]

    def __len__(self) -> int:
        return len(self.boundaries) - 1

    def bucket_of(self, t: int) -> int:
        """The bucket holding timestep `t`."""
        if not 0 <= int(t) < self.num_timesteps:
            raise SubnetError(f"timestep {t} is outside [0, {self.num_timesteps})")
        return bisect.bisect_right(self.boundaries, int(t)) - 1

    def bucket_index(self, t: torch.Tensor) -> torch.Tensor:
        """Bucket of every timestep in `t` (same shape, long)."""
        inner = torch.tensor(self.boundaries[1:-1], dtype=t.dtype, device=t.device)
        return torch.bucketize(t, inner, right=True)

    def step_counts(self, timesteps: Sequence[int]) -> list[int]:
        """How many of the sampler's `timesteps` fall into each bucket."""
        counts = [0] * len(self)
        for t in timesteps:
            counts[self.bucket_of(t)] += 1
        return counts

    def label(self, k: int) -> str:
        """Human-readable range of bucket k, e.g. 't 750-999'."""
        return f"t {self.boundaries[k]}-{self.boundaries[k + 1] - 1}"


@dataclass(frozen=True)
class SubnetSchedule:
    """One subnet per timestep bucket; the sampler runs `subnets[buckets.bucket_of(t)]` at timestep t."""

    buckets: TimestepBuckets
    subnets: tuple[Subnet, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "subnets", tuple(self.subnets))
        if len(self.subnets) != len(self.buckets):
            raise SubnetError(f"schedule has {len(self.subnets)} subnets for {len(self.buckets)} timestep buckets")
        depths = {s.depth for s in self.subnets}
        if len(depths) > 1:
            raise SubnetError(f"schedule subnets have different depths {sorted(depths)}")

    @classmethod
    def static(cls, subnet: Subnet, buckets: TimestepBuckets) -> SubnetSchedule:
        """The same subnet in every bucket."""
        return cls(buckets, (subnet,) * len(buckets))

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return self.subnets[0].depth

    @property
    def is_static(self) -> bool:
        """True when every bucket runs the same subnet."""
        return len(set(self.subnets)) == 1

    def subnet_at(self, t: int) -> Subnet:
        """The subnet for timestep `t`."""
        return self.subnets[self.buckets.bucket_of(t)]

    def validate(self, config: DiTConfig) -> None:
        """Raise SubnetError naming the bucket whose subnet does not fit `config`."""
        if self.buckets.num_timesteps <= 0:
            raise SubnetError("schedule has no timesteps")
        for k, subnet in enumerate(self.subnets):
            try:
                subnet.validate(config)
            except SubnetError as exc:
                raise SubnetError(f"schedule bucket {k} ({self.buckets.label(k)}): {exc}") from None

    def union(self) -> Subnet:
        """The smallest subnet holding every bucket's: per block the most heads, channels and tokens used."""
        blocks = []
        for choices in zip(*(s.blocks for s in self.subnets), strict=True):
            blocks.append(BlockChoice(
                max(c.heads for c in choices), max(c.mlp_hidden for c in choices), max(c.token_ratio for c in choices)
            ))
        return Subnet(tuple(blocks))

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"timestep_boundaries": [...], "buckets": [{"blocks": [...]}, ...]}."""
        return {"timestep_boundaries": list(self.buckets.boundaries), "buckets": [s.to_dict() for s in self.subnets]}

    @classmethod
    def from_dict(cls, data: Any) -> SubnetSchedule:
        """Parse the JSON form (SubnetError on a malformed document)."""
        if not is_schedule_doc(data):
            raise SubnetError("a schedule needs the keys 'timestep_boundaries' and 'buckets'")
        buckets = data["buckets"]
        if not isinstance(buckets, list):
            raise SubnetError(f"schedule 'buckets' must be a list of subnets, got {type(buckets).__name__}")
        bounds = data["timestep_boundaries"]
        if not isinstance(bounds, list):
            raise SubnetError(f"schedule 'timestep_boundaries' must be a list, got {bounds!r}")
        return cls(TimestepBuckets(tuple(bounds)), tuple(Subnet.from_dict(s) for s in buckets))

    def save(self, path: str | Path) -> None:
        """Write the JSON form atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self, config: DiTConfig) -> str:
        """One line per bucket."""
        return "\n".join(f"{self.buckets.label(k)}: {s.describe(config)}" for k, s in enumerate(self.subnets))


def is_schedule_doc(data: Any) -> bool:
    """True for the JSON form of a schedule (as opposed to a single subnet)."""
    return isinstance(data, dict) and "buckets" in data and "timestep_boundaries" in data


def load_subnet_or_schedule(path: str | Path) -> Subnet | SubnetSchedule:
    """A subnet or a schedule JSON file (a search's best.json works too), with errors naming the file."""
    path = Path(path)
    data = read_subnet_json(path)
    for key in ("schedule", "subnet"):  # a search's best.json, or a checkpoint's config.json
        if isinstance(data, dict) and "blocks" not in data and isinstance(data.get(key), dict):
            data = data[key]
            break
    try:
        return SubnetSchedule.from_dict(data) if is_schedule_doc(data) else Subnet.from_dict(data)
    except SubnetError as exc:
        raise SubnetError(f"subnet file '{path}': {exc}") from None
