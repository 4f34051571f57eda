"""Latency tables: what each part of a DiT costs on one device, and a subnet's latency predicted as their sum.

A table holds, for one model config, batch, device and dtype, the measured seconds of the embedders (patch,
position, timestep and label embedding), of each block choice in two halves, and of the final layer:

* ``attn[heads]``: adaLN modulation, norm1 and attention with that many heads, with its residual;
* ``mlp[(mlp_hidden, tokens)]``: norm2, the token router when tokens are dropped, the MLP of that width on that
  many tokens, and its residual (scatter).

A block's latency is ``attn[heads] + mlp[(mlp_hidden, tokens)]`` and a subnet's is ``scale`` times the sum of the
embedders, every block and the final layer. ``scale`` (1.0 when absent) is fitted by the benchmark on whole forwards
of calibration subnets (never the validation ones): parts timed alone in a loop find their inputs and freed buffers
in cache, which a whole forward does not (on the 2-core CPU the plain sum under-predicted DiT-B/2 by ~6%). A token
count between two measured ones of the same MLP width is interpolated linearly. A timestep schedule's latency is the
mean over the sampler's steps, as
:func:`dynasearch.cost.flops.mean_flops` is for FLOPs. Tables are measured by ``dynasearch bench latency-table``
(:mod:`dynasearch.bench.latency_table`) and read back with :meth:`LatencyTable.load`, which checks every field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BudgetError, ConfigError, DynasearchError, SubnetError
from ..fileio import atomic_write_text, read_json
from ..model.config import DiTConfig
from ..model.rates import tokens_kept
from ..model.schedule import SubnetSchedule
from ..model.subnet import BlockChoice, Subnet

__all__ = [
    "ARCH_FIELDS",
    "SCALE_RANGE",
    "TABLE_FORMAT",
    "LatencyTable",
    "LatencyTableError",
    "format_latency",
    "parse_latency",
]

TABLE_FORMAT = "dynasearch-latency-table/1"
ARCH_FIELDS = (
    "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma",
    "qk_norm", "token_selection", "router_ratio",
)
"""The config fields latency depends on: a table fits a supernet when all of them match."""
DTYPES = ("float32", "bfloat16")
SCALE_RANGE = (0.25, 4.0)
"""Whole-forward corrections outside this range mean the timing went wrong (a load change), not a fit."""


class LatencyTableError(DynasearchError):
    """A latency table that is missing, corrupt, or made for another model."""


def _seconds(value: Any, what: str) -> float:
    """`value` as positive finite seconds, or LatencyTableError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LatencyTableError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _count(value: Any, what: str, top: int) -> int:
    """`value` as an integer in [1, top], or LatencyTableError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise LatencyTableError(f"{what} must be an integer in [1, {top}], got {value!r}")
    return value


@dataclass(frozen=True)
class LatencyTable:
    """Measured seconds of every part of one model on one device, at one batch size and dtype."""

    model: DiTConfig
    batch: int
    device: str
    dtype: str
    embed: float
    final: float
    attn: dict[int, float]
    mlp: dict[tuple[int, int], float]
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0  # whole-forward correction of the parts' sum, fitted on calibration subnets

    def __post_init__(self) -> None:
        cfg = self.model
        if not isinstance(cfg, DiTConfig) or cfg.is_sliced:
            raise LatencyTableError("a latency table's model must be a supernet config (no per-block sizes)")
        _count(self.batch, "batch", 1 << 30)
        if self.device not in ("cpu", "cuda"):
            raise LatencyTableError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise LatencyTableError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _seconds(self.embed, "embed")
        _seconds(self.final, "final")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and SCALE_RANGE[0] <= self.scale <= SCALE_RANGE[1]):
            raise LatencyTableError(f"scale must be a number in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}], got "
                                    f"{self.scale!r}")
        if not self.attn or not self.mlp:
            raise LatencyTableError("a latency table needs at least one attention and one MLP entry")
        for heads, value in self.attn.items():
            _count(heads, "attention entry heads", cfg.num_heads)
            _seconds(value, f"attention entry of {heads} heads")
        for (width, tokens), value in self.mlp.items():
            _count(width, "MLP entry mlp_hidden", cfg.mlp_hidden)
            if width % cfg.mlp_group_size:
                raise LatencyTableError(f"MLP entry mlp_hidden {width} is not a multiple of the group size "
                                        f"{cfg.mlp_group_size}")
            _count(tokens, f"MLP entry tokens (mlp_hidden {width})", cfg.num_tokens)
            _seconds(value, f"MLP entry of {width} channels on {tokens} tokens")

    # --- prediction ---------------------------------------------------------------------------------------------
    def _mlp(self, width: int, tokens: int) -> float:
        """Seconds of the MLP half at `width` channels on `tokens` tokens (interpolated between measured counts)."""
        if (width, tokens) in self.mlp:
            return self.mlp[(width, tokens)]
        counts = sorted(k for w, k in self.mlp if w == width)
        lower = [k for k in counts if k < tokens]
        upper = [k for k in counts if k > tokens]
        if not lower or not upper:
            measured = ", ".join(str(k) for k in counts) or "none"
            raise LatencyTableError(f"the latency table has no MLP entry of {width} channels near {tokens} tokens "
                                    f"(measured token counts: {measured}); re-measure it with that token ratio")
        lo, hi = lower[-1], upper[0]
        a, b = self.mlp[(width, lo)], self.mlp[(width, hi)]
        return a + (b - a) * (tokens - lo) / (hi - lo)

    def block(self, choice: BlockChoice) -> float:
        """Predicted seconds of one block running `choice`."""
        if choice.heads not in self.attn:
            raise LatencyTableError(f"the latency table has no attention entry of {choice.heads} heads")
        k = self.tokens(choice.token_ratio)
        return self.attn[choice.heads] + self._mlp(choice.mlp_hidden, k)

    def tokens(self, token_ratio: float) -> int:
        """Tokens through the MLP at a token ratio (all of them without token selection)."""
        if not self.model.token_selection:
            return self.model.num_tokens
        return tokens_kept(token_ratio, self.model.num_tokens)

    def breakdown(self, subnet: Subnet) -> dict[str, float]:
        """Predicted seconds per part: embed, blocks.I, final (each times `scale`)."""
        try:
            subnet.validate(self.model)
        except SubnetError as exc:
            raise LatencyTableError(f"subnet does not fit the latency table's model: {exc}") from None
        parts = {"embed": self.embed}
        parts.update({f"blocks.{i}": self.block(b) for i, b in enumerate(subnet.blocks)})
        parts["final"] = self.final
        return {k: self.scale * v for k, v in parts.items()}

    def predict(self, subnet: Subnet | None = None) -> float:
        """Predicted seconds of one forward pass of `subnet` (the full model when None) at the table's batch."""
        return sum(self.breakdown(Subnet.full(self.model) if subnet is None else subnet).values())

    def predict_schedule(self, schedule: SubnetSchedule, timesteps: Sequence[int]) -> float:
        """Predicted mean seconds per denoising step of a timestep schedule over the sampler's `timesteps`."""
        if not timesteps:
            raise LatencyTableError("a schedule's latency needs at least one timestep")
        per_bucket = [self.predict(s) for s in schedule.subnets]
        return sum(per_bucket[schedule.buckets.bucket_of(t)] for t in timesteps) / len(timesteps)

    # --- checks -------------------------------------------------------------------------------------------------
    def check_model(self, config: DiTConfig, source: str = "the latency table") -> None:
        """Raise LatencyTableError naming the first latency-relevant config field that differs from `config`'s."""
        for key in ARCH_FIELDS:
            mine, theirs = getattr(self.model, key), getattr(config, key)
            if mine != theirs:
                raise LatencyTableError(f"{source} was measured for {key} {mine!r} ({self.model.name}) but the "
                                        f"supernet has {key} {theirs!r} ({config.name})")

    def check_covers(self, subnets: Sequence[Subnet], source: str = "the latency table") -> None:
        """Raise LatencyTableError when `source` cannot predict one of `subnets` (a missing entry)."""
        for subnet in subnets:
            try:
                self.predict(subnet)
            except LatencyTableError as exc:
                raise LatencyTableError(f"{source}: {exc}") from None

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form (seconds), entries sorted."""
        return {
            "format": TABLE_FORMAT,
            "model": self.model.to_dict(),
            "batch": self.batch,
            "device": self.device,
            "dtype": self.dtype,
            "embed_s": self.embed,
            "final_s": self.final,
            "attn_s": [{"heads": h, "seconds": self.attn[h]} for h in sorted(self.attn)],
            "mlp_s": [{"mlp_hidden": w, "tokens": k, "seconds": self.mlp[(w, k)]} for w, k in sorted(self.mlp)],
            "scale": self.scale,
            "machine": self.machine,
            "settings": self.settings,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, data: Any) -> LatencyTable:
        """Inverse of :meth:`to_dict`; LatencyTableError names the field that is missing or wrong."""
        if not isinstance(data, dict):
            raise LatencyTableError(f"a latency table must be a JSON object, got {type(data).__name__}")
        if data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"format must be '{TABLE_FORMAT}', got {data.get('format')!r}")
        missing = [k for k in ("model", "batch", "device", "dtype", "embed_s", "final_s", "attn_s", "mlp_s")
                   if k not in data]
        if missing:
            raise LatencyTableError(f"missing field(s) {', '.join(missing)}")
        try:
            model = DiTConfig.from_dict(data["model"])
        except (ConfigError, TypeError) as exc:
            raise LatencyTableError(f"model: {exc}") from None
        attn: dict[int, float] = {}
        mlp: dict[tuple[int, int], float] = {}
        for key, keys, out in (("attn_s", ("heads",), attn), ("mlp_s", ("mlp_hidden", "tokens"), mlp)):
            if not isinstance(data[key], list):
                raise LatencyTableError(f"{key} must be a list of entries, got {data[key]!r}")
            for i, entry in enumerate(data[key]):
                if not isinstance(entry, dict) or any(k not in entry for k in (*keys, "seconds")):
                    raise LatencyTableError(f"{key}[{i}] must be an object with {', '.join((*keys, 'seconds'))}")
                index = tuple(entry[k] for k in keys)
                for k, v in zip(keys, index, strict=True):
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise LatencyTableError(f"{key}[{i}].{k} must be an integer, got {v!r}")
                index_key = index[0] if len(index) == 1 else index
                if index_key in out:
                    raise LatencyTableError(f"{key}[{i}] repeats the entry {index_key!r}")
                out[index_key] = _seconds(entry["seconds"], f"{key}[{i}].seconds")  # type: ignore[index]
        extras = {k: data.get(k, {}) for k in ("machine", "settings", "validation")}
        for k, v in extras.items():
            if not isinstance(v, dict):
                raise LatencyTableError(f"{k} must be an object, got {v!r}")
        return cls(model, data["batch"], data["device"], data["dtype"], data["embed_s"], data["final_s"], attn, mlp,
                   **extras, scale=data.get("scale", 1.0))

    def save(self, path: str | Path) -> Path:
        """Write the JSON form to `path` (atomically); returns the path."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LatencyTableError(f"latency table '{path}': its directory cannot be created: "
                                    f"{exc.strerror}") from None
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table written by :meth:`save`; LatencyTableError names the file and what is wrong."""
        path = Path(path)
        data = read_json(path, "latency table", LatencyTableError)
        try:
            return cls.from_dict(data)
        except LatencyTableError as exc:
            raise LatencyTableError(f"latency table '{path}': {exc}") from None


_LATENCY = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>us|ms|s)?\s*$")
_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}


def parse_latency(text: str) -> float:
    """Seconds of a latency budget: '40ms', '0.04s', '500us', or a bare number of milliseconds ('40')."""
    match = _LATENCY.match(text) if isinstance(text, str) else None
    if match is None:
        raise BudgetError(f"--latency '{text}' is not understood; use e.g. 40ms, 0.04s or 40 (milliseconds)")
    value = float(match["num"]) * _SCALE[match["unit"]]
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"--latency '{text}' must be a positive, finite time")
    return value


def format_latency(seconds: float) -> str:
    """Human-readable latency: '41.3 ms', '2.10 s', '850 us'."""
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"
