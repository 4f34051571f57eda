"""The dynamic Diffusion Transformer: embedders, adaLN-Zero blocks with dynamic width and token selection, DiT.

`DiT.to_static(subnet)` builds on the layers' own `to_static`: every block hands back a copy of its active slice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange

from .config import DiTConfig
from .layers import Attention, Mlp, TokenRouter, hollow, modulate, static_copy
from .rates import tokens_kept
from .subnet import BlockChoice, Subnet

__all__ = [
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "PatchEmbed",
    "TimestepEmbedder",
    "get_2d_sincos_pos_embed",
]


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps: sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift  # 0 in DiT, 1 in diffusers (its downscale_freq_shift)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: float = 0.0) -> torch.Tensor:
        """Sinusoidal features [cos | sin] of (possibly fractional) timesteps (B,) -> (B, dim)."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)  # (half,)
        freqs = torch.exp(exponent / (half - shift))  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, D) of timesteps (B,)."""
        freq = self.timestep_embedding(t, self.frequency_embedding_size, shift=self.freq_shift)  # (B, 256)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; the extra last row is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability `dropout_prob` (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings (B, D) of labels (B,), with label dropout when training."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) to patch tokens (B, N, D) with a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) in row-major patch order."""
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning, removable heads and MLP channels, and learned token selection."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        mlp_hidden: int,
        mlp_group_size: int,
        qk_norm: bool = False,
        token_selection: bool = True,
        router_hidden: int = 16,
        mlp_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.router_hidden = router_hidden
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, head_dim=head_dim, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, mlp_hidden, num_groups=max(1, mlp_hidden // mlp_group_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.token_selection = token_selection
        self.token_router = TokenRouter(hidden_size, router_hidden) if token_selection else None
        self.choice = BlockChoice(num_heads, mlp_hidden, 1.0)

    @property
    def attn_rate(self) -> float:
        """Fraction of this block's heads the active choice keeps."""
        return self.choice.heads / self.attn.num_heads

    @property
    def mlp_rate(self) -> float:
        """Fraction of this block's MLP channels the active choice keeps."""
        return self.choice.mlp_hidden / self.mlp.hidden

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        choice: BlockChoice | None = None,
        attn_mask: torch.Tensor | None = None,
        mlp_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens (B, N, D) conditioned on c (B, D); `choice` picks heads, MLP width and token ratio."""
        choice = self.choice if choice is None else choice
        x, mlp_mod = self.attn_part(x, c, choice, attn_mask)
        return self.mlp_part(x, mlp_mod, choice, mlp_mask)

    def attn_part(
        self, x: torch.Tensor, c: torch.Tensor, choice: BlockChoice, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The block's first half: adaLN, attention with `choice.heads` and its residual; also the MLP's modulation."""
        shift_msa, scale_msa, gate_msa, *mlp_mod = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, N, D)
        return x + gate_msa.unsqueeze(1) * self.attn(h, choice.heads, attn_mask), tuple(mlp_mod)  # (B, N, D)

    def mlp_part(
        self,
        x: torch.Tensor,
        mlp_mod: tuple[torch.Tensor, ...],
        choice: BlockChoice,
        mlp_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's second half: the MLP of `choice.mlp_hidden` channels on the routed tokens, and its residual."""
        shift_mlp, scale_mlp, gate_mlp = mlp_mod
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, N, D)
        k = x.shape[1] if self.token_router is None else tokens_kept(choice.token_ratio, x.shape[1])
        if k >= x.shape[1]:  # every token kept: exactly the DiT block, no router
            return x + gate_mlp.unsqueeze(1) * self.mlp(h, choice.mlp_hidden, mlp_mask)  # (B, N, D)
        scores = self.token_router(h)  # (B, N)
        idx = scores.topk(k, dim=1, sorted=False).indices  # (B, k)
        idx_d = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, k, D)
        gate = torch.sigmoid(scores.gather(1, idx))  # (B, k)
        straight_through = (1.0 + gate - gate.detach()).unsqueeze(-1)  # (B, k, 1): value 1, router gets gradients
        out = self.mlp(h.gather(1, idx_d), choice.mlp_hidden, mlp_mask)  # (B, k, D)
        out = out * (gate_mlp.unsqueeze(1) * straight_through)  # (B, k, D)
        # (B, N, D): unselected tokens keep their residual value; `out` in x's dtype as CUDA autocast promotes
        # scatter_add (CPU autocast does not: bf16 `out` into a float32 residual would fail there)
        return x.scatter_add(1, idx_d, out.to(x.dtype))

    def to_static(self, choice: BlockChoice) -> DiTBlock:
        """A block of `choice.heads` heads and `choice.mlp_hidden` MLP channels holding a copy of that slice."""
        block = hollow(
            DiTBlock,
            self.hidden_size,
            choice.heads,
            self.attn.head_dim,
            choice.mlp_hidden,
            self.mlp.group_size,
            qk_norm=self.attn.qk_norm,
            token_selection=self.token_selection,
            router_hidden=self.router_hidden,
            mlp_norm_eps=self.norm2.eps,
        )
        block.attn = self.attn.to_static(choice.heads)
        block.mlp = self.mlp.to_static(choice.mlp_hidden)
        block.adaLN_modulation = static_copy(self.adaLN_modulation)
        block.token_router = None if self.token_router is None else static_copy(self.token_router)
        block.choice = choice
        return block


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Patch values (B, N, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


class DiT(nn.Module):
    """Diffusion Transformer whose blocks run any subnet of itself by slicing (a weight-sharing supernet)."""

    def __init__(self, config: DiTConfig, complete_model: bool = False) -> None:
        config.check_memory()  # sizes that cannot fit are refused before the first tensor is allocated
        super().__init__()
        self.config = config
        self.complete_model = complete_model
        self.grad_checkpoint = False  # per-block activation checkpointing in forward (training memory for compute)
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, freq_shift=config.time_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(
                d,
                config.heads_of(i),
                config.head_dim,
                config.mlp_hidden_of(i),
                config.mlp_group_size,
                qk_norm=config.qk_norm,
                token_selection=config.token_selection,
                router_hidden=config.router_hidden,
                mlp_norm_eps=config.mlp_norm_eps,
            )
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()
        self.set_subnet(Subnet.full(config))

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, fixed sin-cos positions, zeroed adaLN and output layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.config.hidden_size, self.config.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def subnet(self) -> Subnet:
        """The subnet `forward` runs by default."""
        return self._subnet

    def set_subnet(self, subnet: Subnet) -> None:
        """Make `forward` run `subnet` (validated against this model) by slicing."""
        subnet.validate(self.config)
        self._subnet = subnet
        for block, choice in zip(self.blocks, subnet.blocks, strict=True):
            block.choice = choice

    @torch.no_grad()
    def to_static(self, subnet: Subnet) -> DiT:
        """A standalone DiT holding a copy of the `subnet` slice of this one: per-block physical sizes, same outputs."""
        config = self.config.sliced(subnet)
        param = next(self.parameters())
        # Built and initialised like every DiT, so a seeded run draws the same random numbers after slicing.
        small = DiT(config).to(device=param.device, dtype=param.dtype)
        for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):  # nothing to slice: copied whole
            getattr(small, name).load_state_dict(getattr(self, name).state_dict())
        small.pos_embed.copy_(self.pos_embed)
        for i, (block, choice) in enumerate(zip(self.blocks, subnet.blocks, strict=True)):
            small.blocks[i] = block.to_static(choice)
        small.set_subnet(small.subnet)
        return small.train(self.training)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Patch values (B, N, p*p*C) back to images (B, C, H, W)."""
        p, g = self.config.patch_size, self.config.grid_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=g, w=g, p=p, q=p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        subnet: Subnet | None = None,
        label_dropout: bool | None = None,
    ) -> torch.Tensor:
        """Predict (B, C_out, H, W) for latents x (B, C, H, W), timesteps t (B,) and labels y (B,).

        `subnet` overrides the active subnet for this call; `complete_model` forces full width.
        `label_dropout` defaults to `self.training`.
        """
        if self.complete_model:
            choices = Subnet.full(self.config.replace(block_token_ratios=None)).blocks
        elif subnet is not None:
            subnet.validate(self.config)
            choices = subnet.blocks
        else:
            choices = self._subnet.blocks
        h, c = self.embed(x, t, y, self.training if label_dropout is None else label_dropout)
        checkpointed = self.grad_checkpoint and torch.is_grad_enabled()
        for block, choice in zip(self.blocks, choices, strict=True):
            if checkpointed:  # keep only the block's input; its activations are recomputed in the backward
                h = torch.utils.checkpoint.checkpoint(block, h, c, choice, use_reentrant=False)  # (B, N, D)
            else:
                h = block(h, c, choice)  # (B, N, D)
        return self.head(h, c)  # (B, C_out, H, W)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (B, N, D) and the condition (B, D): timestep plus label embedding."""
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        return h, self.t_embedder(t) + self.y_embedder(y, train)  # (B, D)

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final layer and unpatchify: tokens (B, N, D) to the prediction (B, C_out, H, W)."""
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, subnet: Subnet | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries null labels; guides every epsilon channel."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (B, C, H, W)
        out = self.forward(combined, t, y, subnet=subnet, label_dropout=False)  # (B, C_out, H, W)
        c = self.config.in_channels
        eps, rest = out[:, :c], out[:, c:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # (B/2, C, H, W)
        eps = torch.cat([half_eps, half_eps], dim=0)  # (B, C, H, W)
        return torch.cat([eps, rest], dim=1)  # (B, C_out, H, W)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings (grid_size**2, embed_dim), half the channels per axis."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    ww, hh = np.meshgrid(grid_w, grid_h)  # width varies fastest, as in DiT
    emb_w = _sincos_1d(embed_dim // 2, ww.reshape(-1))  # first half: the column coordinate
    emb_h = _sincos_1d(embed_dim // 2, hh.reshape(-1))
    return np.concatenate([emb_w, emb_h], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding [sin | cos] (M, embed_dim) of positions (M,)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
