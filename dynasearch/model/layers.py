"""Dynamic layers: linear layers, attention and MLP whose widths shrink at run time by slicing."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

__all__ = ["round_to_nearest", "DynaLinear", "DynaQKVLinear", "Attention", "Mlp", "TokenRouter", "modulate"]


def round_to_nearest(input_size: int, width_mult: float, num_heads: int, min_value: int = 1) -> int:
    """Width of `input_size` scaled by `width_mult`, rounded to whole heads (groups), never below `min_value` heads."""
    heads = max(min_value, math.floor(num_heads * width_mult + 0.5 + 1e-9))
    return input_size // num_heads * min(heads, num_heads)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DynaLinear(nn.Linear):
    """An nn.Linear owning full-size weights whose input and/or output side can shrink at run time.

    `dyna_dim = (in_dynamic, out_dynamic)` chooses the sides that follow `width_mult`, rounded to whole groups
    (`num_groups`, e.g. attention heads; None: single channels); explicit sizes passed to `forward` take precedence. Slicing keeps the first channels (`weight[:out, :in]`), so channels should be
    ordered by importance first (see `dynasearch.slicing.reorder_by_importance`).
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

    def forward(self, x: torch.Tensor, in_features: int | None = None, out_features: int | None = None) -> torch.Tensor:
        """Apply the top-left (out, in) slice of the weight."""
        n_in, n_out = self.active_sizes(in_features, out_features)
        weight = self.weight[:n_out, :n_in]
        bias = None if self.bias is None else self.bias[:n_out]
        return F.linear(x, weight, bias)

    def to_static(self, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
        """A plain nn.Linear holding a copy of the active slice."""
        n_in, n_out = self.active_sizes(in_features, out_features)
        layer = nn.Linear(n_in, n_out, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.weight[:n_out, :n_in])
            if self.bias is not None:
                layer.bias.copy_(self.bias[:n_out])
        return layer.to(self.weight.device, self.weight.dtype)


class DynaQKVLinear(nn.Linear):
    """The fused q/k/v projection (weight rows laid out as [q | k | v], each heads x head_dim); keeps the first heads of all three."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = True) -> None:
        super().__init__(dim, 3 * num_heads * head_dim, bias=bias)
        self.num_heads = num_heads
        self.head_dim = head_dim

    def sliced_parameters(self, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (3*heads*head_dim, D) and bias of the first `heads` heads of q, k and v."""
        if heads == self.num_heads:
            return self.weight, self.bias
        w = rearrange(self.weight, "(three h d) c -> three h d c", three=3, h=self.num_heads)
        weight = rearrange(w[:, :heads], "three h d c -> (three h d) c")
        bias = None
        if self.bias is not None:
            b = rearrange(self.bias, "(three h d) -> three h d", three=3, h=self.num_heads)
            bias = rearrange(b[:, :heads], "three h d -> (three h d)")
        return weight, bias

    def forward(self, x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """q, k, v of shape (3, B, heads, N, head_dim)."""
        heads = self.num_heads if heads is None else heads
        weight, bias = self.sliced_parameters(heads)
        qkv = F.linear(x, weight, bias)  # (B, N, 3*h*d)
        return rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)

    def to_static(self, heads: int) -> nn.Linear:
        """A plain nn.Linear holding a copy of the first `heads` heads of q, k and v."""
        weight, bias = self.sliced_parameters(heads)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.to(self.weight.device, self.weight.dtype)


class Attention(nn.Module):
    """Multi-head self-attention whose heads can be removed (sliced) or masked per sample."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if head_dim is None else head_dim
        self.qkv = DynaQKVLinear(dim, num_heads, self.head_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = DynaLinear(num_heads * self.head_dim, dim, dyna_dim=(True, False), num_groups=num_heads)

    def forward(self, x: torch.Tensor, heads: int | None = None, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend with the first `heads` heads; `channel_mask` (B, heads) scales each head's output per sample."""
        heads = self.num_heads if heads is None else heads
        q, k, v = self.qkv(x, heads)  # each (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        if channel_mask is not None:
            out = out * channel_mask[:, :heads, None, None].to(out.dtype)  # (B, h, N, d)
        out = rearrange(out, "b h n d -> b n (h d)")  # (B, N, h*d)
        return self.proj(out, in_features=heads * self.head_dim)  # (B, N, D)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, whose hidden channels can be removed (sliced) or masked per sample in groups."""

    def __init__(self, dim: int, hidden: int, num_groups: int = 1) -> None:
        super().__init__()
        self.hidden = hidden
        self.num_groups = num_groups
        self.fc1 = DynaLinear(dim, hidden, dyna_dim=(False, True), num_groups=num_groups)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = DynaLinear(hidden, dim, dyna_dim=(True, False), num_groups=num_groups)

    def forward(self, x: torch.Tensor, hidden: int | None = None, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run with the first `hidden` channels; `channel_mask` (B, groups) scales each channel group per sample."""
        hidden = self.hidden if hidden is None else hidden
        h = self.act(self.fc1(x, out_features=hidden))  # (B, N, hidden)
        if channel_mask is not None:
            group = self.hidden // self.num_groups
            mask = channel_mask[:, : hidden // group].repeat_interleave(group, dim=1).to(h.dtype)  # (B, hidden)
            h = h * mask.unsqueeze(1)
        return self.fc2(h, in_features=hidden)  # (B, N, D)


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
