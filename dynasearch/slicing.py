"""Physical slicing of a supernet into a standalone smaller DiT, and importance re-ordering of heads and channels."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from .model.dit import DiT, DiTBlock
from .model.schedule import SubnetSchedule
from .model.subnet import Subnet

__all__ = [
    "slice_subnet", "slice_schedule", "sliced_config", "reorder_by_importance", "head_importance", "channel_importance",
]


def sliced_config(model: DiT, subnet: Subnet):
    """The config of the standalone model that `subnet` of `model` becomes (per-block physical sizes)."""
    subnet.validate(model.config)
    return model.config.replace(
        block_heads=tuple(b.heads for b in subnet.blocks),
        block_mlp_hidden=tuple(b.mlp_hidden for b in subnet.blocks),
        block_token_ratios=tuple(float(b.token_ratio) for b in subnet.blocks),
    )


@torch.no_grad()
def slice_subnet(model: DiT, subnet: Subnet) -> DiT:
    """A standalone DiT whose layers are physically the `subnet` slice of `model` (weights copied, same outputs)."""
    config = sliced_config(model, subnet)
    param = next(model.parameters())
    small = DiT(config).to(device=param.device, dtype=param.dtype)
    source = model.state_dict()
    target = small.state_dict()
    for name, dest in target.items():
        src = source[name]
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            heads = dest.shape[0] // (3 * config.head_dim)
            src = rearrange(src, "(three h d) ... -> three h d ...", three=3, d=config.head_dim)[:, :heads]
            src = rearrange(src, "three h d ... -> (three h d) ...")
        else:
            src = src[tuple(slice(0, n) for n in dest.shape)]
        dest.copy_(src)
    small.train(model.training)
    return small


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
    qkv = rearrange(attn.qkv.weight, "(three h d) c -> three h (d c)", three=3, h=attn.num_heads)
    proj = rearrange(attn.proj.weight, "c (h d) -> h (c d)", h=attn.num_heads)
    return qkv[2].norm(dim=1) * proj.norm(dim=1)


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
        _permute_heads(block, head_order)
        _permute_channels(block, channel_order)
        orders.append((head_order, channel_order))
    return orders


def _permute_heads(block: DiTBlock, order: torch.Tensor) -> None:
    attn = block.attn
    h = attn.num_heads
    w = rearrange(attn.qkv.weight, "(three h d) c -> three h d c", three=3, h=h)[:, order]
    attn.qkv.weight.copy_(rearrange(w, "three h d c -> (three h d) c"))
    b = rearrange(attn.qkv.bias, "(three h d) -> three h d", three=3, h=h)[:, order]
    attn.qkv.bias.copy_(rearrange(b, "three h d -> (three h d)"))
    p = rearrange(attn.proj.weight, "c (h d) -> c h d", h=h)[:, order]
    attn.proj.weight.copy_(rearrange(p, "c h d -> c (h d)"))


def _permute_channels(block: DiTBlock, order: torch.Tensor) -> None:
    mlp = block.mlp
    _copy(mlp.fc1.weight, mlp.fc1.weight[order])
    _copy(mlp.fc1.bias, mlp.fc1.bias[order])
    _copy(mlp.fc2.weight, mlp.fc2.weight[:, order])


def _copy(param: nn.Parameter, value: torch.Tensor) -> None:
    param.copy_(value.clone())
