"""The attention head layout: how the fused q/k/v projection and the output projection split into heads.

The fused q/k/v weight (3*H*d, D) and bias (3*H*d,) hold their rows as [q | k | v], each H heads of d rows, as in
DiT and timm; the output projection's weight (D, H*d) holds one block of d columns per head. Every place that
keeps the first heads, permutes heads or splits activations into heads goes through these functions.
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = [
    "first_qkv_heads",
    "merge_heads",
    "permute_proj_heads",
    "permute_qkv_heads",
    "proj_heads",
    "qkv_heads",
    "qkv_rows",
    "split_qkv",
]


def qkv_heads(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Fused q/k/v rows (3*H*d, ...) viewed as (3, H, d, ...): q, k, v x heads x head channels."""
    return rearrange(rows, "(three h d) ... -> three h d ...", three=3, h=num_heads)


def qkv_rows(heads: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`qkv_heads`: (3, h, d, ...) back to fused rows (3*h*d, ...)."""
    return rearrange(heads, "three h d ... -> (three h d) ...")


def first_qkv_heads(rows: torch.Tensor, num_heads: int, heads: int) -> torch.Tensor:
    """The fused rows (3*heads*d, ...) of the first `heads` heads of each of q, k and v (`rows` itself when all)."""
    if heads == num_heads:
        return rows
    return qkv_rows(qkv_heads(rows, num_heads)[:, :heads])


def permute_qkv_heads(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Fused rows (3*H*d, ...) with the heads of q, k and v all put in `order` (H,); a new tensor."""
    return qkv_rows(qkv_heads(rows, len(order))[:, order])


def proj_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Output-projection weight (D, H*d) viewed as (D, H, d): its input columns per head."""
    return rearrange(weight, "c (h d) -> c h d", h=num_heads)


def permute_proj_heads(weight: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Output-projection weight (D, H*d) with its head column blocks put in `order` (H,); a new tensor."""
    return rearrange(proj_heads(weight, len(order))[:, order], "c h d -> c (h d)")


def split_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Fused projections (B, N, 3*h*d) as q, k, v of shape (3, B, h, N, d)."""
    return rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs (B, h, N, d) as tokens (B, N, h*d), the output projection's input layout."""
    return rearrange(out, "b h n d -> b n (h d)")
