"""FLOPs in fvcore's convention (one multiply-add = one FLOP): a closed form and an fvcore count that must agree.

The closed form answers "what does this subnet cost" from configs alone (fast, used by the search); the fvcore
count traces the real module (used to check exported models). Both count the matmuls of linear layers,
convolutions and attention (q k^T and attn v), and LayerNorm as fvcore does (4 per element, 5 with an affine);
element-wise ops (activations, modulation, residual adds, softmax) count zero, as in fvcore and the DiT paper.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..errors import BudgetError
from ..model.config import DiTConfig
from ..model.rates import tokens_kept
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet

__all__ = [
    "FlopsCount",
    "closed_form_breakdown",
    "closed_form_by_module",
    "closed_form_flops",
    "closed_form_params",
    "count_flops",
    "format_flops",
    "parse_budget",
]

_LN, _LN_AFFINE = 4, 5  # fvcore's LayerNorm cost per element without / with an affine


def closed_form_breakdown(config: DiTConfig, subnet: Subnet | None = None, batch: int = 1) -> dict[str, int]:
    """FLOPs per module (names as in the model) of one forward pass of `batch` samples under `subnet`."""
    subnet = Subnet.full(config) if subnet is None else subnet
    subnet.validate(config)
    d, n, p = config.hidden_size, config.num_tokens, config.patch_size
    hd = config.head_dim
    parts: dict[str, int] = {
        "x_embedder": n * d * config.in_channels * p * p,
        "t_embedder": 256 * d + d * d,
    }
    for i, b in enumerate(subnet.blocks):
        inner = b.heads * hd
        k = tokens_kept(b.token_ratio, n) if (b.token_ratio < 1.0 and config.token_selection) else n
        pre = f"blocks.{i}"
        parts[f"{pre}.adaLN_modulation"] = d * 6 * d
        parts[f"{pre}.norm1"] = _LN * n * d
        parts[f"{pre}.attn.qkv"] = n * d * 3 * inner
        if config.qk_norm:
            parts[f"{pre}.attn.q_norm"] = _LN_AFFINE * n * inner
            parts[f"{pre}.attn.k_norm"] = _LN_AFFINE * n * inner
        parts[f"{pre}.attn.sdpa"] = 2 * n * n * inner
        parts[f"{pre}.attn.proj"] = n * inner * d
        parts[f"{pre}.norm2"] = _LN * n * d
        if k < n:
            r = config.router_hidden
            parts[f"{pre}.token_router"] = n * (d * r + r)
        parts[f"{pre}.mlp"] = 2 * k * d * b.mlp_hidden
    parts["final_layer"] = d * 2 * d + _LN * n * d + n * d * p * p * config.out_channels
    return {key: value * batch for key, value in parts.items()}


def closed_form_flops(config: DiTConfig, subnet: Subnet | None = None, batch: int = 1) -> int:
    """Total FLOPs of one forward pass of `batch` samples under `subnet` (full model when None)."""
    return sum(closed_form_breakdown(config, subnet, batch).values())


def closed_form_by_module(config: DiTConfig, subnet: Subnet | None = None, batch: int = 1) -> dict[str, int]:
    """The closed form summed at every level of the module tree, keyed like fvcore's `by_module` ('' = total)."""
    totals: dict[str, int] = {}
    for key, value in closed_form_breakdown(config, subnet, batch).items():
        module = key.removesuffix(".sdpa")  # attention's matmuls belong to the Attention module itself
        parts = module.split(".")
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            totals[prefix] = totals.get(prefix, 0) + value
    return totals


def closed_form_params(config: DiTConfig, subnet: Subnet | None = None, routers: bool = True) -> int:
    """Parameters of the standalone model `subnet` slices out of `config` (pos_embed included, as in DiT)."""
    subnet = Subnet.full(config) if subnet is None else subnet
    subnet.validate(config)
    d, n, p, hd = config.hidden_size, config.num_tokens, config.patch_size, config.head_dim
    total = d * config.in_channels * p * p + d  # x_embedder
    total += 256 * d + d + d * d + d  # t_embedder
    total += (config.num_classes + int(config.class_dropout_prob > 0)) * d  # y_embedder (null class row)
    total += n * d  # pos_embed
    total += d * p * p * config.out_channels + p * p * config.out_channels + d * 2 * d + 2 * d  # final_layer
    for b in subnet.blocks:
        inner = b.heads * hd
        total += d * 3 * inner + 3 * inner + inner * d + d  # attn.qkv, attn.proj
        total += 4 * hd if config.qk_norm else 0
        total += 2 * d * b.mlp_hidden + b.mlp_hidden + d  # mlp.fc1, mlp.fc2
        total += 6 * d * d + 6 * d  # adaLN_modulation
        if routers and config.token_selection:
            r = config.router_hidden
            total += d * r + r + r + 1
    return total


@dataclass
class FlopsCount:
    """An fvcore count: the total, per module (every level of the module tree) and per operator."""

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_operator: dict[str, int] = field(default_factory=dict)
    skipped_ops: dict[str, int] = field(default_factory=dict)


def _sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """fvcore handler for aten::scaled_dot_product_attention: q k^T and attn v, one FLOP per multiply-add."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    flops = batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]
    return Counter({"scaled_dot_product_attention": flops})


class _Call(nn.Module):
    """Calls a model's forward with a fixed subnet, so counting never mutates the model."""

    def __init__(self, model: nn.Module, subnet: Subnet | None) -> None:
        super().__init__()
        self.model = model
        self.subnet = subnet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward with the fixed subnet."""
        if self.subnet is None:
            return self.model(x, t, y)
        return self.model(x, t, y, subnet=self.subnet)


def count_flops(model: nn.Module, subnet: Subnet | None = None, batch: int = 1) -> FlopsCount:
    """Count one forward pass of `batch` samples with fvcore (attention included through a registered handler)."""
    config: DiTConfig = model.config
    param = next(model.parameters())
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=param.device)
    t = torch.full((batch,), 500, dtype=torch.long, device=param.device)
    y = torch.zeros(batch, dtype=torch.long, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
            analysis = FlopCountAnalysis(_Call(model, subnet), (x, t, y))
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
            by_module = {_strip(name): int(v) for name, v in analysis.by_module().items()}
            by_operator = {name: int(v) for name, v in analysis.by_operator().items()}
            skipped = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    return FlopsCount(total=total, by_module=by_module, by_operator=by_operator, skipped_ops=skipped)


def _strip(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else ("" if name == "model" else name)


_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BUDGET = re.compile(
    r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*"
    r"(?:(?P<unit>[kKMGT]?)\s*(?:FLOPs|FLOPS|FLOP|flops|flop)?|(?P<rel>x)|(?P<pct>%))\s*$"
)


def parse_budget(text: str, full_flops: int | None = None) -> int:
    """FLOPs of a budget string: '50G', '50GFLOPs', '5e10', '500M', '0.5x' or '50%' (relative to `full_flops`)."""
    if not isinstance(text, str):
        raise BudgetError(f"FLOPs budget must be a string such as '50G' or '0.5x', got {text!r}")
    match = _BUDGET.match(text)
    if not match:
        raise BudgetError(
            f"FLOPs budget '{text}' is not understood; use e.g. 50G, 50GFLOPs, 5e10, 500M, 0.5x or 50%"
        )
    value = float(match["num"])
    if match["rel"] or match["pct"]:
        if full_flops is None:
            raise BudgetError(f"FLOPs budget '{text}' is relative, but no full-model FLOPs figure is known")
        value = value * full_flops / (100.0 if match["pct"] else 1.0)
    else:
        value *= _UNITS[match["unit"] or ""]
    if not math.isfinite(value):
        raise BudgetError(f"FLOPs budget '{text}' is not a finite number")
    if value <= 0:
        raise BudgetError(f"FLOPs budget '{text}' must be positive")
    return round(value)


def format_flops(flops: float) -> str:
    """Human-readable FLOPs: '118.69G'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f}{unit}"
    return f"{flops:.0f}"


def bucket_flops(schedule: SubnetSchedule, config: DiTConfig) -> list[int]:
    """Closed-form FLOPs (batch 1) of one step of every bucket's subnet."""
    return [closed_form_flops(config, s) for s in schedule.subnets]


def step_flops(schedule: SubnetSchedule, config: DiTConfig, timesteps: Sequence[int]) -> list[int]:
    """Closed-form FLOPs (batch 1) of every denoising step, in the order of `timesteps`."""
    per_bucket = bucket_flops(schedule, config)
    return [per_bucket[schedule.buckets.bucket_of(t)] for t in timesteps]


def mean_flops(schedule: SubnetSchedule, config: DiTConfig, timesteps: Sequence[int]) -> float:
    """Mean FLOPs per denoising step of a timestep schedule over the sampler's `timesteps` (batch 1)."""
    steps = step_flops(schedule, config, timesteps)
    return sum(steps) / len(steps)


def flops_per_step(
    config: DiTConfig, subnet: Subnet | SubnetSchedule | None, steps: int, diffusion: GaussianDiffusion | None = None
) -> float:
    """Closed-form FLOPs per denoising step (batch 1, without guidance) of a subnet (None: the full model), or of a
    schedule averaged over a `steps` DDIM run of `diffusion` (default: the model's own)."""
    if isinstance(subnet, SubnetSchedule):
        diffusion = diffusion if diffusion is not None else diffusion_for(config)
        return mean_flops(subnet, config, diffusion.timestep_schedule(steps))
    return float(closed_form_flops(config, subnet))
