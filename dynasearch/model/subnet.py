"""Subnets: one frozen, hashable, JSON-serialisable choice per block of heads, MLP width and token ratio.

A :class:`Subnet` holds one :class:`BlockChoice` per block: the attention heads kept, the MLP hidden channels kept
and the fraction of tokens routed through the MLP. :meth:`Subnet.from_rates` turns rates into these sizes through
:mod:`dynasearch.model.rates`; :meth:`Subnet.validate` names the block and value that do not fit a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SubnetError
from ..fileio import read_json
from .rates import check_rate, rate_to_heads, rate_to_mlp_hidden

if TYPE_CHECKING:
    from .config import DiTConfig

__all__ = ["BlockChoice", "Subnet", "read_subnet_json"]


def read_subnet_json(path: Path) -> Any:
    """The parsed JSON of a subnet (or schedule) file, with SubnetError naming the file when it cannot be read."""
    return read_json(path, "subnet file", SubnetError)


@dataclass(frozen=True)
class BlockChoice:
    """One block's choice: attention heads kept, MLP hidden channels kept, fraction of tokens through the MLP."""

    heads: int
    mlp_hidden: int
    token_ratio: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"heads": self.heads, "mlp_hidden": self.mlp_hidden, "token_ratio": self.token_ratio}


@dataclass(frozen=True)
class Subnet:
    """A subnet of a dynamic DiT: one :class:`BlockChoice` per block."""

    blocks: tuple[BlockChoice, ...]

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def full(cls, config: DiTConfig) -> Subnet:
        """The largest subnet of a model: every physical head and channel, its default token ratios."""
        return cls(
            tuple(
                BlockChoice(config.heads_of(i), config.mlp_hidden_of(i), config.token_ratio_of(i))
                for i in range(config.depth)
            )
        )

    @classmethod
    def uniform(
        cls, config: DiTConfig, attn_rate: float = 1.0, mlp_rate: float = 1.0, token_ratio: float = 1.0
    ) -> Subnet:
        """The same rates in every block (rates are fractions of the full supernet's widths)."""
        depth = config.depth
        return cls.from_rates(config, [attn_rate] * depth, [mlp_rate] * depth, [token_ratio] * depth)

    @classmethod
    def from_rates(
        cls,
        config: DiTConfig,
        attn_rates: Sequence[float],
        mlp_rates: Sequence[float],
        token_ratios: Sequence[float],
    ) -> Subnet:
        """Per-block rates converted to whole heads and channel groups."""
        for name, values in (("attn_rates", attn_rates), ("mlp_rates", mlp_rates), ("token_ratios", token_ratios)):
            if len(values) != config.depth:
                raise SubnetError(f"{name} has {len(values)} entries for a model of {config.depth} blocks")
        blocks = []
        for i, (a, m, r) in enumerate(zip(attn_rates, mlp_rates, token_ratios, strict=True)):
            check_rate("token_ratio", r, i)
            blocks.append(BlockChoice(rate_to_heads(config, a, i), rate_to_mlp_hidden(config, m, i), float(r)))
        subnet = cls(tuple(blocks))
        subnet.validate(config)
        return subnet

    # --- queries ------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def attn_rates(self, config: DiTConfig) -> list[float]:
        """Heads kept as a fraction of the full model's heads, per block."""
        return [b.heads / config.num_heads for b in self.blocks]

    def mlp_rates(self, config: DiTConfig) -> list[float]:
        """MLP channels kept as a fraction of the full model's MLP width, per block."""
        return [b.mlp_hidden / config.mlp_hidden for b in self.blocks]

    @property
    def token_ratios(self) -> list[float]:
        """Token ratio per block."""
        return [b.token_ratio for b in self.blocks]

    def validate(self, config: DiTConfig) -> None:
        """Raise :class:`SubnetError` naming the block and value that do not fit `config`."""
        if len(self.blocks) != config.depth:
            raise SubnetError(f"subnet has {len(self.blocks)} blocks but model '{config.name}' has {config.depth}")
        group = config.mlp_group_size
        for i, b in enumerate(self.blocks):
            if not isinstance(b, BlockChoice):
                raise SubnetError(f"block {i}: expected a BlockChoice, got {type(b).__name__}")
            max_heads = config.heads_of(i)
            if isinstance(b.heads, bool) or not isinstance(b.heads, int) or not 1 <= b.heads <= max_heads:
                raise SubnetError(f"block {i}: heads must be an integer in [1, {max_heads}], got {b.heads!r}")
            max_mlp = config.mlp_hidden_of(i)
            if isinstance(b.mlp_hidden, bool) or not isinstance(b.mlp_hidden, int) or not 1 <= b.mlp_hidden <= max_mlp:
                raise SubnetError(f"block {i}: mlp_hidden must be an integer in [1, {max_mlp}], got {b.mlp_hidden!r}")
            if b.mlp_hidden % group and b.mlp_hidden != max_mlp:
                raise SubnetError(f"block {i}: mlp_hidden {b.mlp_hidden} is not a multiple of the group size {group}")
            r = b.token_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise SubnetError(f"block {i}: token_ratio must be in (0, 1], got {r!r}")
            if r < 1.0 and not config.token_selection:
                raise SubnetError(f"block {i}: token_ratio {r} needs token selection, which model '{config.name}' "
                                  "lacks")

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"blocks": [{"heads", "mlp_hidden", "token_ratio"}, ...]}."""
        return {"blocks": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: Any) -> Subnet:
        """Inverse of :meth:`to_dict`, with errors that name the bad field."""
        if not isinstance(data, dict) or not isinstance(data.get("blocks"), list):
            raise SubnetError('a subnet must be a JSON object with a "blocks" list')
        blocks = []
        for i, item in enumerate(data["blocks"]):
            if not isinstance(item, dict):
                raise SubnetError(f"block {i}: expected an object, got {item!r}")
            unknown = sorted(set(item) - {"heads", "mlp_hidden", "token_ratio"})
            if unknown:
                raise SubnetError(f"block {i}: unknown key(s) {', '.join(unknown)}")
            try:
                heads, mlp_hidden = item["heads"], item["mlp_hidden"]
            except KeyError as exc:
                raise SubnetError(f"block {i}: missing key {exc.args[0]!r}") from None
            ratio = item.get("token_ratio", 1.0)
            for key, value in (("heads", heads), ("mlp_hidden", mlp_hidden)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SubnetError(f"block {i}: {key} must be an integer, got {value!r}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise SubnetError(f"block {i}: token_ratio must be a number, got {ratio!r}")
            blocks.append(BlockChoice(heads, mlp_hidden, float(ratio)))
        return cls(tuple(blocks))

    def to_json(self) -> str:
        """Compact JSON."""
        return json.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the JSON form to `path`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Subnet:
        """Read a subnet JSON file."""
        path = Path(path)
        data = read_subnet_json(path)
        try:
            return cls.from_dict(data)
        except SubnetError as exc:
            raise SubnetError(f"subnet file '{path}': {exc}") from None

    def describe(self, config: DiTConfig) -> str:
        """Short human-readable summary: mean rates."""
        n = max(1, self.depth)
        a = sum(self.attn_rates(config)) / n
        m = sum(self.mlp_rates(config)) / n
        r = sum(self.token_ratios) / n
        return f"attn {a:.2f} / mlp {m:.2f} / tokens {r:.2f}"
