"""Slicing a supernet into standalone smaller DiTs, and re-ordering heads and channels by importance.

`slice_subnet` and `slice_schedule` go through the model's own `DiT.to_static` (each dynamic layer copies out its
active slice); `reorder_by_importance` permutes through the layers' `permute_heads` / `permute_channels`.
"""

from __future__ import annotations

import torch

from .model.config import DiTConfig
from .model.dit import DiT, DiTBlock
from .model.heads import proj_heads, qkv_heads
from .model.schedule import SubnetSchedule
from .model.subnet import Subnet

__all__ = [
    "channel_importance",
    "head_importance",
    "reorder_by_importance",
    "slice_schedule",
    "slice_subnet",
    "sliced_config",
]


def sliced_config(model: DiT, subnet: Subnet) -> DiTConfig:
    """The config of the standalone model that `subnet` of `model` becomes (per-block physical sizes)."""
    return model.config.sliced(subnet)


def slice_subnet(model: DiT, subnet: Subnet) -> DiT:
    """A standalone DiT whose layers are physically the `subnet` slice of `model` (weights copied, same outputs)."""
    return model.to_static(subnet)


def slice_schedule(model: DiT, schedule: SubnetSchedule) -> DiT:
    """A standalone DiT sliced to the union of a schedule's subnets; each bucket's subnet is a prefix slice of it.

    Slicing keeps prefixes of heads and channels, so every bucket's choice (heads, MLP channels, token ratio)
    is valid on the result and runs exactly as it did on the supernet.
    """
    schedule.validate(model.config)
    return slice_subnet(model, schedule.union())


def head_importance(block: DiTBlock) -> torch.Tensor:
    """Importance of each head (H,): norm of its value rows times norm of its output-projection columns."""
    attn = block.attn
    v = qkv_heads(attn.qkv.weight, attn.num_heads)[2].flatten(1)  # (H, d*D)
    proj = proj_heads(attn.proj.weight, attn.num_heads).transpose(0, 1).flatten(1)  # (H, D*d)
    return v.norm(dim=1) * proj.norm(dim=1)


def channel_importance(block: DiTBlock) -> torch.Tensor:
    """Importance of each MLP hidden channel (M,): norm of its fc1 row times norm of its fc2 column."""
    return block.mlp.fc1.weight.norm(dim=1) * block.mlp.fc2.weight.norm(dim=0)


@torch.no_grad()
def reorder_by_importance(model: DiT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Permute every block's heads and MLP channels, most important first; the full model's function is unchanged.

    Returns each block's (head order, channel order). Slicing keeps prefixes, so after this the subnets keep the
    most important heads and channels.
    """
    orders = []
    for block in model.blocks:
        head_order = torch.argsort(head_importance(block), descending=True, stable=True)
        channel_order = torch.argsort(channel_importance(block), descending=True, stable=True)
        block.attn.permute_heads(head_order)
        block.mlp.permute_channels(channel_order)
        orders.append((head_order, channel_order))
    return orders
