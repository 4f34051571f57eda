"""Dynamic layers: linear layers, attention and MLP that run a prefix slice of their widths or hand back a copy of it.

Each dynamic layer slices itself the same way in `forward` and in `to_static`, which returns a new layer of the
same class whose full size is the active slice (weights copied, no aliasing), OFA-style. The layers keep the first
heads and channels, so these should be ordered by importance first (`permute_heads` / `permute_channels`).
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import first_qkv_heads, merge_heads, permute_proj_heads, permute_qkv_heads, split_qkv
from .rates import round_to_nearest

__all__ = [
    "Attention",
    "DynaLinear",
    "DynaQKVLinear",
    "Mlp",
    "TokenRouter",
    "hollow",
    "modulate",
    "static_copy",
]

M = TypeVar("M", bound=nn.Module)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def hollow(cls: type[M], *args: Any, **kwargs: Any) -> M:
    """`cls(*args, **kwargs)` built on the meta device: the structure only, no memory and no random draws.

    Every parameter of the result must be replaced (see `to_static`) before it is used.
    """
    with torch.device("meta"):
        return cls(*args, **kwargs)


def static_copy(module: M) -> M:
    """A copy of a layer that has nothing to slice, trainable like a freshly built one."""
    return copy.deepcopy(module).requires_grad_(True)


def _holding(layer: M, weight: torch.Tensor, bias: torch.Tensor | None) -> M:
    """`layer` (built hollow) with trainable contiguous copies of `weight` and `bias` as its parameters."""
    layer.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(memory_format=torch.contiguous_format))
    return layer


class DynaLinear(nn.Linear):
    """An nn.Linear owning full-size weights whose input and/or output side can shrink at run time.

    `dyna_dim = (in_dynamic, out_dynamic)` chooses the sides that follow `width_mult`, rounded to whole groups
    (`num_groups`, e.g. attention heads; None: single channels); explicit sizes passed to `forward` take precedence.
    Slicing keeps the first channels (`weight[:out, :in]`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dyna_dim: tuple[bool, bool] = (True, True),
        num_groups: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.in_features_max = in_features
        self.out_features_max = out_features
        self.dyna_dim = tuple(dyna_dim)
        self.num_groups = num_groups
        self.width_mult = 1.0

    def active_sizes(self, in_features: int | None = None, out_features: int | None = None) -> tuple[int, int]:
        """(in, out) sizes for this call: explicit sizes, else `width_mult` on the dynamic sides."""
        if in_features is None:
            in_features = self.in_features_max
            if self.dyna_dim[0] and self.width_mult != 1.0:
                groups = self.num_groups or self.in_features_max
                in_features = round_to_nearest(self.in_features_max, self.width_mult, groups)
        if out_features is None:
            out_features = self.out_features_max
            if self.dyna_dim[1] and self.width_mult != 1.0:
                groups = self.num_groups or self.out_features_max
                out_features = round_to_nearest(self.out_features_max, self.width_mult, groups)
        return in_features, out_features

    def active_parameters(
        self, in_features: int | None = None, out_features: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The active slice: weight (out, in) = `weight[:out, :in]` and bias (out,), views of the full ones."""
        n_in, n_out = self.active_sizes(in_features, out_features)
        return self.weight[:n_out, :n_in], None if self.bias is None else self.bias[:n_out]

    def forward(self, x: torch.Tensor, in_features: int | None = None, out_features: int | None = None) -> torch.Tensor:
        """Apply the active slice to x (..., in) -> (..., out)."""
        weight, bias = self.active_parameters(in_features, out_features)
        return F.linear(x, weight, bias)  # (..., out)

    def to_static(self, in_features: int | None = None, out_features: int | None = None) -> DynaLinear:
        """A DynaLinear of the active size holding a copy of the active slice, with groups of the same size."""
        weight, bias = self.active_parameters(in_features, out_features)
        n_out, n_in = weight.shape
        groups = self.num_groups
        if groups is not None and self.dyna_dim[0]:
            groups = max(1, n_in * groups // self.in_features_max)
        elif groups is not None and self.dyna_dim[1]:
            groups = max(1, n_out * groups // self.out_features_max)
        layer = hollow(DynaLinear, n_in, n_out, bias=bias is not None, dyna_dim=self.dyna_dim, num_groups=groups)
        return _holding(layer, weight, bias)


class DynaQKVLinear(nn.Linear):
    """The fused q/k/v projection (rows [q | k | v], each heads x head_dim); keeps the first heads of all three."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__(dim, 3 * num_heads * head_dim, bias=bias)
        self.num_heads = num_heads
        self.head_dim = head_dim

    def active_parameters(self, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (3*heads*head_dim, D) and bias of the first `heads` heads of q, k and v."""
        weight = first_qkv_heads(self.weight, self.num_heads, heads)
        return weight, None if self.bias is None else first_qkv_heads(self.bias, self.num_heads, heads)

    def forward(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """q, k, v of shape (3, B, heads, N, head_dim) for tokens (B, N, D)."""
        heads = self.num_heads if heads is None else heads
        weight, bias = self.active_parameters(heads)
        return split_qkv(F.linear(x, weight, bias), heads)  # (3, B, h, N, d)

    def to_static(self, heads: int) -> DynaQKVLinear:
        """A DynaQKVLinear of `heads` heads holding a copy of the first `heads` heads of q, k and v."""
        weight, bias = self.active_parameters(heads)
        layer = hollow(DynaQKVLinear, self.in_features, heads, self.head_dim, bias=bias is not None)
        return _holding(layer, weight, bias)


class Attention(nn.Module):
    """Multi-head self-attention whose heads can be removed (sliced) or masked per sample."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if head_dim is None else head_dim
        self.qk_norm = qk_norm
        self.qkv = DynaQKVLinear(dim, num_heads, self.head_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = DynaLinear(num_heads * self.head_dim, dim, dyna_dim=(True, False), num_groups=num_heads)

    def forward(
        self, x: torch.Tensor, heads: int | None = None, channel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend with the first `heads` heads; `channel_mask` (B, heads) scales each head's output per sample."""
        heads = self.num_heads if heads is None else heads
        q, k, v = self.qkv(x, heads)  # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        if channel_mask is not None:
            out = out * channel_mask[:, :heads, None, None].to(out.dtype)  # (B, h, N, d)
        return self.proj(merge_heads(out), in_features=heads * self.head_dim)  # (B, N, h*d) -> (B, N, D)

    def to_static(self, heads: int) -> Attention:
        """An Attention of `heads` heads holding a copy of the first `heads` heads."""
        attn = hollow(Attention, self.dim, heads, head_dim=self.head_dim, qk_norm=self.qk_norm)
        attn.qkv = self.qkv.to_static(heads)
        attn.q_norm, attn.k_norm = static_copy(self.q_norm), static_copy(self.k_norm)
        attn.proj = self.proj.to_static(in_features=heads * self.head_dim)
        return attn

    @torch.no_grad()
    def permute_heads(self, order: torch.Tensor) -> None:
        """Put the heads in `order` (H,), in place: q/k/v rows and projection columns move together (same function)."""
        self.qkv.weight.copy_(permute_qkv_heads(self.qkv.weight, order))
        if self.qkv.bias is not None:
            self.qkv.bias.copy_(permute_qkv_heads(self.qkv.bias, order))
        self.proj.weight.copy_(permute_proj_heads(self.proj.weight, order))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, whose hidden channels can be removed (sliced) or masked per sample in groups."""

    def __init__(self, dim: int, hidden: int, num_groups: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.num_groups = num_groups
        self.fc1 = DynaLinear(dim, hidden, dyna_dim=(False, True), num_groups=num_groups)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = DynaLinear(hidden, dim, dyna_dim=(True, False), num_groups=num_groups)

    @property
    def group_size(self) -> int:
        """Hidden channels per group: the granularity of slicing and of channel masks."""
        return self.hidden // self.num_groups

    def forward(
        self, x: torch.Tensor, hidden: int | None = None, channel_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run with the first `hidden` channels; `channel_mask` (B, groups) scales each channel group per sample."""
        hidden = self.hidden if hidden is None else hidden
        h = self.act(self.fc1(x, out_features=hidden))  # (B, N, hidden)
        if channel_mask is not None:
            group = self.group_size
            mask = channel_mask[:, : hidden // group].repeat_interleave(group, dim=1).to(h.dtype)  # (B, hidden)
            h = h * mask.unsqueeze(1)  # (B, N, hidden)
        return self.fc2(h, in_features=hidden)  # (B, N, D)

    def to_static(self, hidden: int) -> Mlp:
        """An Mlp of `hidden` channels (groups of the same size) holding a copy of the first `hidden` channels."""
        mlp = hollow(Mlp, self.dim, hidden, num_groups=max(1, hidden // self.group_size))
        mlp.fc1 = self.fc1.to_static(out_features=hidden)
        mlp.fc2 = self.fc2.to_static(in_features=hidden)
        return mlp

    @torch.no_grad()
    def permute_channels(self, order: torch.Tensor) -> None:
        """Put the hidden channels in `order` (M,), in place: fc1 rows and fc2 columns move together (same function)."""
        self.fc1.weight.copy_(self.fc1.weight[order])
        self.fc1.bias.copy_(self.fc1.bias[order])
        self.fc2.weight.copy_(self.fc2.weight[:, order])


class TokenRouter(nn.Module):
    """Scores each token's importance for the MLP (Linear-ReLU-Linear); higher means keep."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, N) for tokens (B, N, D)."""
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)  # (B, N)
