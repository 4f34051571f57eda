"""Rates to sizes: the one rounding of width rates into whole heads and channel groups, and of token ratios into tokens.

Rates are fractions of the full supernet's widths. A width rounds half up (not banker's rounding) to whole groups,
never below one group; a token ratio keeps ceil(r * N) tokens. `round_to_nearest` is also what a `DynaLinear`
applies to its `width_mult`, so a layer and a subnet at the same rate keep the same channels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import SubnetError

if TYPE_CHECKING:
    from .config import DiTConfig

__all__ = ["check_rate", "rate_to_heads", "rate_to_mlp_hidden", "round_to_nearest", "tokens_kept"]


def round_to_nearest(input_size: int, width_mult: float, num_heads: int, min_value: int = 1) -> int:
    """Width of `input_size` scaled by `width_mult`, rounded half up to whole heads (groups), at least `min_value`."""
    heads = max(min_value, math.floor(num_heads * width_mult + 0.5 + 1e-9))
    return input_size // num_heads * min(heads, num_heads)


def rate_to_heads(config: DiTConfig, rate: float, block: int = 0) -> int:
    """Heads kept at an attention rate: round(num_heads * rate) of the block's heads, at least one."""
    check_rate("attn_rate", rate, block)
    return min(config.heads_of(block), round_to_nearest(config.num_heads, rate, config.num_heads))


def rate_to_mlp_hidden(config: DiTConfig, rate: float, block: int = 0) -> int:
    """MLP channels kept at an MLP rate, rounded to whole channel groups, at least one group."""
    check_rate("mlp_rate", rate, block)
    return min(config.mlp_hidden_of(block), round_to_nearest(config.mlp_hidden, rate, config.mlp_groups))


def tokens_kept(token_ratio: float, num_tokens: int) -> int:
    """Tokens that pass through the MLP at a token ratio: ceil(r * N), at least 1."""
    return max(1, min(num_tokens, math.ceil(token_ratio * num_tokens - 1e-9)))


def check_rate(name: str, rate: float, block: int) -> None:
    """Raise SubnetError naming the block unless `rate` is a number in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < rate <= 1.0):
        raise SubnetError(f"block {block}: {name} must be in (0, 1], got {rate!r}")
