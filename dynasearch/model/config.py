"""Model configurations and the named registry (DiT-S/B/L/XL x /2 /4 /8 plus tiny CPU configs)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checks import check_memory, format_bytes, memory_limit
from ..errors import ConfigError
from .rates import tokens_kept

if TYPE_CHECKING:
    from .subnet import Subnet

__all__ = ["DIT_CONFIGS", "FREQUENCY_EMBEDDING_SIZE", "DiTConfig", "get_config", "model_names"]

FREQUENCY_EMBEDDING_SIZE = 256
"""Sinusoidal timestep features before the timestep MLP (DiT's and diffusers' value)."""


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a (super)net; sliced models add their per-block physical sizes."""

    name: str = "custom"
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    token_selection: bool = True
    router_ratio: float = 0.125
    # Physical per-block sizes of a sliced model; None means full width (a supernet).
    block_heads: tuple[int, ...] | None = None
    block_mlp_hidden: tuple[int, ...] | None = None
    # Token ratios a sliced model runs with by default; None means 1.0 everywhere.
    block_token_ratios: tuple[float, ...] | None = None
    # Numerics that differ between DiT and diffusers' DiTTransformer2DModel (defaults: DiT's).
    time_shift: float = 0.0  # frequency shift of the sinusoidal timestep features (diffusers: 1)
    mlp_norm_eps: float = 1e-6  # eps of each block's LayerNorm before the MLP (diffusers: its norm_eps, 1e-5)

    def __post_init__(self) -> None:
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model config '{self.name}': {key} must be a positive integer, got {value!r}")
        for key in ("mlp_ratio", "router_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model config '{self.name}': {key} must be a finite number > 0, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model config '{self.name}': hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}"
            )
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"model config '{self.name}': input_size {self.input_size} is not divisible by patch_size "
                f"{self.patch_size}"
            )
        if self.mlp_hidden % self.num_heads:
            raise ConfigError(
                f"model config '{self.name}': MLP width {self.mlp_hidden} is not divisible into {self.num_heads} groups"
            )
        if isinstance(self.time_shift, bool) or not isinstance(self.time_shift, (int, float)) or not (
            0.0 <= self.time_shift < FREQUENCY_EMBEDDING_SIZE // 2
        ):
            raise ConfigError(
                f"model config '{self.name}': time_shift must be a number in [0, {FREQUENCY_EMBEDDING_SIZE // 2}), "
                f"got {self.time_shift!r}"
            )
        eps = self.mlp_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps < 1:
            raise ConfigError(f"model config '{self.name}': mlp_norm_eps must be a number in (0, 1), got {eps!r}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model config '{self.name}': class_dropout_prob must be in [0, 1), got "
                              f"{self.class_dropout_prob}")
        for key in ("block_heads", "block_mlp_hidden", "block_token_ratios"):
            value = getattr(self, key)
            if value is not None and len(value) != self.depth:
                raise ConfigError(f"model config '{self.name}': {key} has {len(value)} entries for {self.depth} blocks")
        self._check_blocks()

    def _check_blocks(self) -> None:
        """Physical per-block sizes must be whole heads / channel groups within the full model."""
        group = self.mlp_hidden // self.num_heads
        for i, h in enumerate(self.block_heads or ()):
            if isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= self.num_heads:
                raise ConfigError(f"model config '{self.name}': block {i} heads must be an integer in [1, "
                                  f"{self.num_heads}], got {h!r}")
        for i, m in enumerate(self.block_mlp_hidden or ()):
            ok = isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= self.mlp_hidden
            if not ok or m % group:
                raise ConfigError(
                    f"model config '{self.name}': block {i} MLP width must be a multiple of {group} in "
                    f"[{group}, {self.mlp_hidden}], got {m!r}"
                )
        for i, r in enumerate(self.block_token_ratios or ()):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise ConfigError(f"model config '{self.name}': block {i} token ratio must be in (0, 1], got {r!r}")

    def parameter_terms(self) -> dict[str, int]:
        """Parameters (upper-bound estimate, no allocation) by the field that drives them: what a size check names."""
        h, depth, p2 = self.hidden_size, self.depth, self.patch_size**2
        mlp = int(self.hidden_size * self.mlp_ratio)
        return {
            "num_classes": (self.num_classes + 1) * h,
            "input_size": (self.input_size // self.patch_size) ** 2 * h,
            "in_channels": p2 * self.in_channels * h * 3,
            "hidden_size": depth * 10 * h * h + 256 * h + 3 * h * h,
            "mlp_ratio": depth * 2 * h * mlp,
            "router_ratio": depth * 2 * h * max(1, round(h * self.router_ratio)),
        }

    def check_memory(self) -> None:
        """Raise ConfigError naming the field whose size makes the parameters alone exceed this machine's memory."""
        terms = self.parameter_terms()
        need = 4 * sum(terms.values())  # float32
        if need > memory_limit():
            key = max(terms, key=lambda k: terms[k])
            raise ConfigError(
                f"model config '{self.name}': {key} {getattr(self, key)!r} needs about {format_bytes(need)} of memory "
                f"for the parameters alone; this machine has {format_bytes(memory_limit())}"
            )

    def check_batch(self, batch: int, option: str) -> None:
        """Raise ConfigError naming `option` when one forward pass of `batch` inputs cannot fit in memory."""
        tokens, h = (self.input_size // self.patch_size) ** 2, self.hidden_size
        per_input = tokens * (12 * h + 2 * int(h * self.mlp_ratio)) + self.num_heads * tokens * tokens
        check_memory(4 * batch * per_input, f"{option} {batch} (a forward pass of {self.name} at "
                     f"{self.input_size}x{self.input_size}x{self.in_channels})", ConfigError)

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Full MLP hidden width."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def mlp_groups(self) -> int:
        """Number of MLP channel groups (one per attention head, as in DyDiT)."""
        return self.num_heads

    @property
    def mlp_group_size(self) -> int:
        """Channels per MLP group: the granularity of MLP slicing."""
        return self.mlp_hidden // self.mlp_groups

    @property
    def router_hidden(self) -> int:
        """Hidden width of the token router."""
        return max(1, round(self.hidden_size * self.router_ratio))

    @property
    def out_channels(self) -> int:
        """Output channels: epsilon plus, with learn_sigma, the variance interpolation."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image."""
        return self.grid_size**2

    @property
    def is_sliced(self) -> bool:
        """True for a physically sliced standalone model."""
        return self.block_heads is not None or self.block_mlp_hidden is not None

    def heads_of(self, block: int) -> int:
        """Physical number of heads of a block."""
        return self.num_heads if self.block_heads is None else self.block_heads[block]

    def mlp_hidden_of(self, block: int) -> int:
        """Physical MLP hidden width of a block."""
        return self.mlp_hidden if self.block_mlp_hidden is None else self.block_mlp_hidden[block]

    def token_ratio_of(self, block: int) -> float:
        """Default token ratio of a block."""
        return 1.0 if self.block_token_ratios is None else self.block_token_ratios[block]

    def tokens_kept(self, token_ratio: float) -> int:
        """Tokens that pass through the MLP at a token ratio (see :func:`~dynasearch.model.rates.tokens_kept`)."""
        return tokens_kept(token_ratio, self.num_tokens)

    def sliced(self, subnet: Subnet) -> DiTConfig:
        """The config of the standalone model that `subnet` (validated) of this model becomes: its per-block sizes."""
        subnet.validate(self)
        return self.replace(
            block_heads=tuple(b.heads for b in subnet.blocks),
            block_mlp_hidden=tuple(b.mlp_hidden for b in subnet.blocks),
            block_token_ratios=tuple(float(b.token_ratio) for b in subnet.blocks),
        )

    def supernet(self) -> DiTConfig:
        """The same config without per-block physical sizes."""
        return dataclasses.replace(self, block_heads=None, block_mlp_hidden=None, block_token_ratios=None)

    def replace(self, **changes: Any) -> DiTConfig:
        """A copy with some fields changed (validated)."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ConfigError(f"model config '{self.name}': {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the OPTIONAL_FIELDS only where they differ from their defaults)."""
        out = dataclasses.asdict(self)
        for key in ("block_heads", "block_mlp_hidden", "block_token_ratios"):
            if out[key] is not None:
                out[key] = list(out[key])
        for key, default in OPTIONAL_FIELDS.items():
            if out[key] == default:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config has unknown keys: {', '.join(unknown)}")
        kwargs = dict(data)
        for key in ("block_heads", "block_mlp_hidden", "block_token_ratios"):
            if kwargs.get(key) is not None:
                if not isinstance(kwargs[key], (list, tuple)):
                    raise ConfigError(f"model config: {key} must be a list, got {kwargs[key]!r}")
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(self.to_dict(), indent=2)


OPTIONAL_FIELDS: dict[str, Any] = {"time_shift": 0.0, "mlp_norm_eps": 1e-6}
"""Fields added after format version 1: written only where not default, so older config.json files load as DiT."""

# depth, hidden_size, num_heads per size; patch sizes 2, 4, 8.
_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    # Small configs for the CPU demo and the tests (not in the DiT paper).
    "T": (6, 128, 8),
    "N": (2, 32, 4),
}

DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch}
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}
"""Registry: name -> architecture fields. Its keys feed the CLI's choices and test parametrisation."""


def model_names() -> list[str]:
    """Registry names, largest first."""
    return list(DIT_CONFIGS)


def get_config(name: str, **overrides: Any) -> DiTConfig:
    """Config of a registry model, with data-dependent fields (input_size, in_channels, ...) overridden."""
    if name not in DIT_CONFIGS:
        raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(DIT_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model option(s) for '{name}': {', '.join(unknown)}")
    return DiTConfig(**{"name": name, **DIT_CONFIGS[name], **overrides})
