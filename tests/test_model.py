"""Tests for dynasearch.model: registry shapes and parameter counts, DiT-compatible state dicts, exact equality of the
full subnet with an independent re-implementation of the original DiT forward, slicing == removing, channel masks,
token selection, classifier-free guidance, label dropout, the dynamic linear layers and the position embedding."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, model_inputs, randomize_

import dynasearch
from dynasearch.errors import ConfigError, DynasearchError
from dynasearch.model import (
    DIT_CONFIGS,
    Attention,
    DiT,
    DiTConfig,
    DynaLinear,
    DynaQKVLinear,
    LabelEmbedder,
    Mlp,
    get_2d_sincos_pos_embed,
    get_config,
    round_to_nearest,
    tokens_kept,
)
from dynasearch.model.heads import (
    first_qkv_heads,
    merge_heads,
    permute_proj_heads,
    permute_qkv_heads,
    proj_heads,
    qkv_heads,
    qkv_rows,
    split_qkv,
)
from dynasearch.model.rates import rate_to_heads, rate_to_mlp_hidden
from dynasearch.model.subnet import BlockChoice, Subnet

PAPER = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
"""depth, hidden, heads of the DiT paper's models (Peebles & Xie, Table 1)."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def dit_param_count(depth: int, d: int, p: int, c: int, classes: int, input_size: int, learn_sigma: bool = True) -> int:
    """Closed-form parameter count of the ORIGINAL DiT (facebookresearch/DiT), pos_embed included."""
    c_out = 2 * c if learn_sigma else c
    n = (input_size // p) ** 2
    patch = c * p * p * d + d
    t_emb = (256 * d + d) + (d * d + d)
    y_emb = (classes + 1) * d
    pos = n * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (d * p * p * c_out + p * p * c_out) + (2 * d * d + 2 * d)
    return patch + t_emb + y_emb + pos + depth * block + final


def router_param_count(depth: int, d: int, router_hidden: int) -> int:
    """Linear(D, r) + Linear(r, 1) per block."""
    return depth * ((d * router_hidden + router_hidden) + (router_hidden + 1))


def meta_model(config: DiTConfig) -> DiT:
    """The model on the meta device: exact structure and shapes, no memory, no init time."""
    with torch.device("meta"):
        return DiT(config)


def expected_state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """The original DiT's state-dict layout at full width (no routers)."""
    d, p, c = config.hidden_size, config.patch_size, config.in_channels
    c_out = config.out_channels
    mlp = int(d * config.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, config.num_tokens, d),
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (config.num_classes + 1, d),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(config.depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "mlp.fc1.weight": (mlp, d),
                b + "mlp.fc1.bias": (mlp,),
                b + "mlp.fc2.weight": (d, mlp),
                b + "mlp.fc2.bias": (d,),
                b + "adaLN_modulation.1.weight": (6 * d, d),
                b + "adaLN_modulation.1.bias": (6 * d,),
            }
        )
    return shapes


def expected_router_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    d, r = config.hidden_size, config.router_hidden
    out: dict[str, tuple[int, ...]] = {}
    for i in range(config.depth):
        b = f"blocks.{i}.token_router."
        out.update({b + "fc1.weight": (r, d), b + "fc1.bias": (r,), b + "fc2.weight": (1, r), b + "fc2.bias": (1,)})
    return out


# --- an independent, plain-torch re-implementation of the original DiT forward (facebookresearch/DiT models.py) ----
def ref_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def ref_dit_forward(
    sd: dict[str, torch.Tensor],
    config: DiTConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    block_heads: list[int] | None = None,
) -> torch.Tensor:
    """Original DiT forward from a state dict. `block_heads` gives each block's physical heads (default: full)."""
    d, p, c_out = config.hidden_size, config.patch_size, config.out_channels
    head_dim = config.head_dim
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    te = ref_timestep_embedding(t)
    te = F.linear(te, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])
    te = F.linear(F.silu(te), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = te + sd["y_embedder.embedding_table.weight"][y]
    B, N, _ = h.shape
    for i in range(config.depth):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        # attention (timm layout: qkv reshape (B, N, 3, H, d), permute)
        heads = config.num_heads if block_heads is None else block_heads[i]
        a_in = ref_modulate(F.layer_norm(h, (d,), eps=1e-6), shift_msa, scale_msa)
        qkv = F.linear(a_in, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        qkv = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        a = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, heads * head_dim)
        a = F.linear(a, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + gate_msa.unsqueeze(1) * a
        m_in = ref_modulate(F.layer_norm(h, (d,), eps=1e-6), shift_mlp, scale_mlp)
        m = F.gelu(F.linear(m_in, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh")
        m = F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + gate_mlp.unsqueeze(1) * m
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod.chunk(2, dim=1)
    h = ref_modulate(F.layer_norm(h, (d,), eps=1e-6), shift, scale)
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])  # (B, N, p*p*C_out)
    g = int(N**0.5)
    h = h.reshape(B, g, g, p, p, c_out)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(B, c_out, g * p, g * p)


def ref_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """The MAE/DiT reference get_2d_sincos_pos_embed, transcribed."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def mlp_branch_removed(block: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a DiTBlock whose MLP outputs exactly zero (fc2 weight and bias zeroed)."""
    out = copy.deepcopy(block)
    with torch.no_grad():
        out.mlp.fc2.weight.zero_()
        out.mlp.fc2.bias.zero_()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 1. Registry: forward shapes and parameter counts
# ---------------------------------------------------------------------------------------------------------------------
def test_registry_contents() -> None:
    assert len(DIT_CONFIGS) == 18
    for size, (depth, hidden, heads) in PAPER.items():
        for p in (2, 4, 8):
            cfg = get_config(f"DiT-{size}/{p}")
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, p)
            assert cfg.mlp_hidden == 4 * hidden and cfg.head_dim == hidden // heads


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_param_count_matches_closed_form_dit(name: str) -> None:
    """At the paper setting (32x32x4 latents, 1000 classes): total - routers == original DiT (built on meta)."""
    cfg = get_config(name, input_size=32, in_channels=4, num_classes=1000)
    model = meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    routers = sum(p.numel() for n, p in model.named_parameters() if ".token_router." in n)
    assert routers == router_param_count(cfg.depth, cfg.hidden_size, cfg.router_hidden)
    expected = dit_param_count(cfg.depth, cfg.hidden_size, cfg.patch_size, 4, 1000, 32)
    assert total - routers == expected
    # the router parameters live only under blocks.N.token_router.*
    assert all(n.startswith("blocks.") for n, _ in model.named_parameters() if "token_router" in n)


def test_param_counts_of_the_dit_paper() -> None:
    """Known counts of the released DiT checkpoints (pos_embed included)."""
    cfg = get_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    model = meta_model(cfg)
    no_router = sum(p.numel() for n, p in model.named_parameters() if ".token_router." not in n)
    assert no_router == 675_129_632  # the released DiT-XL/2-256 checkpoint
    # the closed form reproduces it; the other sizes are pinned so that a change of the formula is noticed
    assert dit_param_count(28, 1152, 2, 4, 1000, 32) == 675_129_632
    assert dit_param_count(28, 1152, 8, 4, 1000, 32) == 675_683_072
    assert dit_param_count(12, 384, 2, 4, 1000, 32) == 32_963_360


def test_router_params_xl2() -> None:
    cfg = get_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert cfg.router_hidden == 144
    model = meta_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 + 28 * (1152 * 144 + 144 + 144 + 1)


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_forward_shape_paper_setting_meta(name: str) -> None:
    """Forward shapes at the real 32x32x4 / 1000-class setting of every entry (meta device: shapes only)."""
    cfg = get_config(name, input_size=32, in_channels=4, num_classes=1000)
    model = meta_model(cfg).eval()
    with torch.device("meta"), torch.no_grad():
        x = torch.randn(1, 4, 32, 32)
        out = model(x, torch.tensor([10.0]), torch.tensor([3]))
    assert out.shape == (1, 8, 32, 32)


_CHEAP = [n for n in DIT_CONFIGS if get_config(n).hidden_size <= 768]


@pytest.mark.parametrize("name", _CHEAP)
def test_forward_real_small_registry_entries(name: str) -> None:
    """A real (CPU) forward of the B/S/T/N entries at a tiny spatial size: shape, finite, depends on inputs."""
    torch.manual_seed(0)
    p = get_config(name).patch_size
    cfg = get_config(name, input_size=2 * p, in_channels=4, num_classes=1000)
    with torch.no_grad():
        model = DiT(cfg).eval()
        fresh = model(*model_inputs(cfg, batch=1))
        # DiT's adaLN-Zero init: the fresh model predicts exactly zero
        assert fresh.shape == (1, 8, 2 * p, 2 * p)
        assert torch.count_nonzero(fresh) == 0
        # randomise only the (zero-initialised) final layer: cheap and enough to get a non-trivial output
        randomize_(model.final_layer, seed=3)
        x, t, y = model_inputs(cfg, batch=1)
        out = model(x, t, y)
        out2 = model(x + 1.0, t, y)
    assert out.shape == (1, 8, 2 * p, 2 * p)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert not torch.allclose(out, out2)


# ---------------------------------------------------------------------------------------------------------------------
# 2. State-dict layout
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("DiT-N/2", {"input_size": 8, "in_channels": 1, "num_classes": 10}),
                                     ("DiT-XL/2", {"input_size": 32, "in_channels": 4, "num_classes": 1000}),
                                     ("DiT-B/4", {"input_size": 32, "in_channels": 4, "num_classes": 1000})])
def test_state_dict_layout_equals_original_dit(name: str, kw: dict) -> None:
    cfg = get_config(name, **kw)
    model = meta_model(cfg)
    sd = model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = expected_state_dict_shapes(cfg)
    routers = expected_router_shapes(cfg)
    assert set(got) == set(expected) | set(routers)
    for k, shape in {**expected, **routers}.items():
        assert got[k] == shape, k
    # the only extra keys are the routers
    assert {k for k in got if k not in expected} == set(routers)
    # pos_embed is in the state dict but frozen
    assert "pos_embed" in sd and not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_state_dict_without_token_selection_is_exactly_dit() -> None:
    cfg = get_config("DiT-N/4", input_size=16, in_channels=4, num_classes=7, token_selection=False)
    model = meta_model(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_state_dict_shapes(cfg)


def test_original_dit_state_dict_loads_strictly_apart_from_routers(tiny_model) -> None:
    """A checkpoint without routers loads into the supernet with only router keys missing."""
    cfg = tiny_model.config
    dit_sd = {k: v.clone() for k, v in tiny_model.state_dict().items() if ".token_router." not in k}
    other = DiT(cfg)
    result = other.load_state_dict(dit_sd, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(expected_router_shapes(cfg))


# ---------------------------------------------------------------------------------------------------------------------
# 3. Full subnet == an independent implementation of the original DiT forward
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "small"])
def test_full_subnet_matches_reference_dit(which: str, tiny_model, small_model) -> None:
    model = tiny_model if which == "tiny" else small_model
    cfg = model.config
    torch.manual_seed(0)
    x, t, y = model_inputs(cfg, batch=3, seed=5)
    with torch.no_grad():
        ref = ref_dit_forward(model.state_dict(), cfg, x, t, y)
        out = model(x, t, y)
        full_ratio_1 = Subnet(tuple(BlockChoice(cfg.num_heads, cfg.mlp_hidden, 1.0) for _ in range(cfg.depth)))
        out_explicit = model(x, t, y, subnet=full_ratio_1)
    assert ref.abs().mean() > 0.1  # the reference itself is non-trivial
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_explicit, ref, atol=1e-5, rtol=1e-5)
    assert model.subnet == Subnet.full(cfg) == full_ratio_1


def test_reference_depends_on_every_ingredient(tiny_model) -> None:
    """Guard against a vacuous reference check: changing t, y or x changes the output."""
    cfg = tiny_model.config
    x, t, y = model_inputs(cfg, batch=2, seed=1)
    with torch.no_grad():
        base = tiny_model(x, t, y)
        assert not torch.allclose(base, tiny_model(x, t + 1.0, y))
        assert not torch.allclose(base, tiny_model(x, t, (y + 1) % cfg.num_classes))
        assert not torch.allclose(base, tiny_model(x.flip(-1), t, y))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Slicing removes heads / channels (equivalent to zeroing their output path), it does not approximate
# ---------------------------------------------------------------------------------------------------------------------
def _zero_removed(model: DiT, subnet: Subnet) -> DiT:
    """Deep copy of the supernet with the proj input columns of removed heads and fc2 input columns of removed MLP
    channels set to zero (what removing a head / channel means)."""
    ref = copy.deepcopy(model)
    d = model.config.head_dim
    with torch.no_grad():
        for block, choice in zip(ref.blocks, subnet.blocks, strict=True):
            block.attn.proj.weight[:, choice.heads * d :] = 0.0
            block.mlp.fc2.weight[:, choice.mlp_hidden :] = 0.0
    return ref


@pytest.mark.parametrize(
    "heads,mlp",
    [
        ((2, 3, 1, 8, 5, 4), None),
        (None, (64, 192, 512, 64, 320, 128)),
        ((1, 7, 4, 2, 8, 3), (448, 64, 256, 512, 128, 64)),
    ],
)
def test_sliced_supernet_equals_zeroed_full_model(small_model, heads, mlp) -> None:
    cfg = small_model.config
    heads = heads or (cfg.num_heads,) * cfg.depth
    mlp = mlp or (cfg.mlp_hidden,) * cfg.depth
    subnet = Subnet(tuple(BlockChoice(h, m, 1.0) for h, m in zip(heads, mlp, strict=True)))
    x, t, y = model_inputs(cfg, batch=2, seed=2)
    with torch.no_grad():
        sliced = small_model(x, t, y, subnet=subnet)
        full = small_model(x, t, y)
        zeroed_ref = _zero_removed(small_model, subnet)
        zeroed = zeroed_ref(x, t, y)
        # also the reference DiT forward on the zeroed weights
        ref = ref_dit_forward(zeroed_ref.state_dict(), cfg, x, t, y)
    torch.testing.assert_close(sliced, zeroed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliced, ref, atol=1e-5, rtol=1e-5)
    assert (sliced - full).abs().max() > 1e-3  # the subnet really is a different function


def test_set_subnet_equals_per_call_subnet(small_model) -> None:
    cfg = small_model.config
    subnet = Subnet.uniform(cfg, attn_rate=0.5, mlp_rate=0.25)
    x, t, y = model_inputs(cfg, batch=2, seed=3)
    with torch.no_grad():
        per_call = small_model(x, t, y, subnet=subnet)
        small_model.set_subnet(subnet)
        assert small_model.subnet == subnet
        assert [b.choice for b in small_model.blocks] == list(subnet.blocks)
        default = small_model(x, t, y)
    torch.testing.assert_close(per_call, default, atol=0, rtol=0)


def test_physically_sliced_model_equals_supernet_under_subnet(small_model) -> None:
    """A DiT built from a config with block_heads / block_mlp_hidden, holding the supernet's first heads and channels,
    computes the same function as the supernet running that subnet."""
    cfg = small_model.config
    heads = (3, 8, 1, 5, 2, 6)
    mlp = (128, 512, 64, 256, 448, 192)
    ratios = (1.0,) * cfg.depth
    subnet = Subnet(tuple(BlockChoice(h, m, r) for h, m, r in zip(heads, mlp, ratios, strict=True)))
    sliced_cfg = cfg.replace(block_heads=heads, block_mlp_hidden=mlp)
    sliced = DiT(sliced_cfg).eval()
    sd = small_model.state_dict()
    new_sd = {}
    d = cfg.head_dim
    for k, v in sliced.state_dict().items():
        src = sd[k]
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            i = int(k.split(".")[1])
            view = src.reshape(3, cfg.num_heads, d, *src.shape[1:])
            src = view[:, : heads[i]].reshape(3 * heads[i] * d, *src.shape[1:])
        new_sd[k] = src[tuple(slice(0, n) for n in v.shape)].clone()
    sliced.load_state_dict(new_sd)
    assert sliced.blocks[2].attn.qkv.weight.shape == (3 * 1 * d, cfg.hidden_size)
    assert sliced.blocks[2].attn.proj.weight.shape == (cfg.hidden_size, 1 * d)
    assert sliced.blocks[4].mlp.fc1.weight.shape == (448, cfg.hidden_size)
    assert sliced.subnet == Subnet.full(sliced_cfg) == subnet
    x, t, y = model_inputs(cfg, batch=2, seed=4)
    with torch.no_grad():
        a = small_model(x, t, y, subnet=subnet)
        b = sliced(x, t, y)
        ref = ref_dit_forward(sliced.state_dict(), cfg, x, t, y, block_heads=list(heads))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, ref, atol=1e-5, rtol=1e-5)
    # the layers' own static copies (DiT.to_static) hold exactly these hand-sliced weights, under the same names
    static = small_model.to_static(subnet)
    assert static.config == sliced_cfg.replace(block_token_ratios=ratios)
    assert list(static.state_dict()) == list(sliced.state_dict())
    assert all(torch.equal(static.state_dict()[k], v) for k, v in sliced.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# 5. Channel masks
# ---------------------------------------------------------------------------------------------------------------------
def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(32, 4)
    return randomize_(attn, seed)


def test_attention_mask_all_ones_is_no_mask() -> None:
    attn = _attention()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, channel_mask=torch.ones(3, 4)), attn(x), atol=0, rtol=0)
        torch.testing.assert_close(attn(x, 2, channel_mask=torch.ones(3, 4)), attn(x, 2), atol=0, rtol=0)


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_attention_mask_trailing_zeros_equals_slicing(kept: int) -> None:
    attn = _attention(1)
    x = torch.randn(2, 9, 32)
    mask = torch.zeros(2, 4)
    mask[:, :kept] = 1
    with torch.no_grad():
        masked = attn(x, channel_mask=mask)
        sliced = attn(x, kept)
        full = attn(x)
    torch.testing.assert_close(masked, sliced, atol=1e-6, rtol=1e-5)
    assert (masked - full).abs().max() > 1e-3


def test_attention_mask_middle_head_equals_zeroed_projection_columns() -> None:
    attn = _attention(2)
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        ref.proj.weight[:, 8:16] = 0.0
        torch.testing.assert_close(attn(x, channel_mask=mask), ref(x), atol=1e-6, rtol=1e-5)


def test_attention_mask_with_sliced_heads_uses_the_first_columns() -> None:
    """With `heads` < num_heads the (B, num_heads) mask's first `heads` columns address the kept heads."""
    attn = _attention(4)
    x = torch.randn(2, 5, 32)
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        ref.proj.weight[:, 8:16] = 0.0  # head 1 removed
        mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
        out = attn(x, 2, channel_mask=mask)
        torch.testing.assert_close(out[0], ref(x, 2)[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[1], attn(x, 2)[1], atol=1e-6, rtol=1e-5)
        assert (out[0] - attn(x, 2)[0]).abs().max() > 1e-3


def test_attention_mask_is_per_sample() -> None:
    attn = _attention(3)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        out = attn(x, channel_mask=mask)
        unmasked = attn(x)
        sliced = attn(x, 2)
    torch.testing.assert_close(out[0], unmasked[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], sliced[1], atol=1e-6, rtol=1e-5)
    assert (out[1] - unmasked[1]).abs().max() > 1e-3


def _mlp(seed: int = 0) -> Mlp:
    torch.manual_seed(seed)
    return randomize_(Mlp(16, 64, num_groups=4), seed)  # groups of 16 channels


def test_mlp_mask_all_ones_is_no_mask() -> None:
    mlp = _mlp()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x, channel_mask=torch.ones(2, 4)), mlp(x), atol=0, rtol=0)


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_mlp_mask_trailing_zeros_equals_slicing(kept: int) -> None:
    mlp = _mlp(1)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 4)
    mask[:, :kept] = 1
    with torch.no_grad():
        masked = mlp(x, channel_mask=mask)
        sliced = mlp(x, 16 * kept)
        full = mlp(x)
    torch.testing.assert_close(masked, sliced, atol=1e-6, rtol=1e-5)
    assert (masked - full).abs().max() > 1e-3


def test_mlp_mask_middle_group_and_per_sample() -> None:
    mlp = _mlp(2)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    ref = copy.deepcopy(mlp)
    with torch.no_grad():
        ref.fc2.weight[:, 16:32] = 0.0
        ref.fc2.weight[:, 48:64] = 0.0
        out = mlp(x, channel_mask=mask)
        torch.testing.assert_close(out[0], mlp(x)[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[1], ref(x)[1], atol=1e-6, rtol=1e-5)
        # with a sliced width the mask still addresses the first groups
        sliced_masked = mlp(x, 32, channel_mask=mask)
        torch.testing.assert_close(sliced_masked[1], mlp(x, 16)[1], atol=1e-6, rtol=1e-5)


def test_block_masks_match_block_slicing(small_model) -> None:
    """DiTBlock passes attn/mlp masks through: trailing-zero masks == the sliced choice."""
    cfg = small_model.config
    block = small_model.blocks[1]
    torch.manual_seed(0)
    x = torch.randn(2, cfg.num_tokens, cfg.hidden_size)
    c = torch.randn(2, cfg.hidden_size)
    amask = torch.tensor([[1.0] * 8, [1.0] * 3 + [0.0] * 5])
    mmask = torch.tensor([[1.0] * 8, [1.0] * 2 + [0.0] * 6])
    full = BlockChoice(8, 512, 1.0)
    with torch.no_grad():
        out = block(x, c, full, attn_mask=amask, mlp_mask=mmask)
        sliced = block(x, c, BlockChoice(3, 128, 1.0))
        unmasked = block(x, c, full)
    torch.testing.assert_close(out[0], unmasked[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], sliced[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Token selection
# ---------------------------------------------------------------------------------------------------------------------
def test_tokens_kept_values(tiny_config) -> None:
    cases = [(1.0, 16, 16), (0.5, 16, 8), (0.25, 16, 4), (0.3, 16, 5), (0.01, 16, 1), (0.7, 10, 7), (0.1, 10, 1),
             (0.11, 10, 2), (0.999, 256, 256), (0.75, 256, 192), (1e-6, 4, 1),
             # r*N lands just above an integer in floating point: 0.07*100 == 7.000000000000001
             (0.07, 100, 7), (0.14, 100, 14), (0.57, 100, 57)]
    for r, n, k in cases:
        assert tokens_kept(r, n) == k, (r, n)
    assert tiny_config.num_tokens == 16
    for r in (0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
        assert tiny_config.tokens_kept(r) == tokens_kept(r, 16)
    hundred = tiny_config.replace(input_size=20)
    assert hundred.num_tokens == 100
    assert [hundred.tokens_kept(r) for r in (0.07, 0.14, 0.5, 0.571)] == [7, 14, 50, 58]


def test_ratio_one_never_calls_the_router(tiny_model, tiny_config) -> None:
    x, t, y = model_inputs(tiny_config, batch=2)
    with torch.no_grad():
        base = tiny_model(x, t, y)
        for block in tiny_model.blocks:
            for p in block.token_router.parameters():
                p.fill_(float("nan"))
        out = tiny_model(x, t, y)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, base, atol=0, rtol=0)
        # while a ratio below one does use it (NaN scores poison the output or the selection)
        sub = Subnet.uniform(tiny_config, token_ratio=0.5)
        calls = []
        hooks = [b.token_router.register_forward_hook(lambda m, i, o: calls.append(o.shape)) for b in tiny_model.blocks]
        tiny_model(x, t, y, subnet=sub)
        for h in hooks:
            h.remove()
    assert calls == [(2, 16)] * tiny_config.depth


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.8])
def test_token_selection_changes_exactly_k_tokens(small_model, ratio: float) -> None:
    cfg = small_model.config
    block = small_model.blocks[2]
    torch.manual_seed(0)
    B, N, D = 3, cfg.num_tokens, cfg.hidden_size
    x = torch.randn(B, N, D)
    c = torch.randn(B, D)
    choice = BlockChoice(8, 512, ratio)
    scores = []
    hook = block.token_router.register_forward_hook(lambda m, i, o: scores.append(o.detach().clone()))
    with torch.no_grad():
        out = block(x, c, choice)
        hook.remove()
        post_attn = mlp_branch_removed(block)(x, c, BlockChoice(8, 512, 1.0))  # x + attention branch only
        dense = block(x, c, BlockChoice(8, 512, 1.0))
    k = tokens_kept(ratio, N)
    assert k == math.ceil(ratio * N)
    changed = (out != post_attn).any(dim=-1)  # (B, N)
    assert changed.sum(dim=1).tolist() == [k] * B
    # the changed tokens are the router's top-k, per sample
    top = scores[0].topk(k, dim=1).indices
    for b in range(B):
        assert set(torch.nonzero(changed[b]).flatten().tolist()) == set(top[b].tolist())
        # unselected tokens are bit-identical to their post-attention residual
        assert torch.equal(out[b, ~changed[b]], post_attn[b, ~changed[b]])
        # selected tokens got the full MLP update (straight-through gate has value 1)
        torch.testing.assert_close(out[b, changed[b]], dense[b, changed[b]], atol=1e-5, rtol=1e-5)
    # different samples pick different tokens (the router is input-dependent)
    assert len({tuple(sorted(top[b].tolist())) for b in range(B)}) > 1


def test_ratio_keeping_every_token_is_the_dense_block(small_model) -> None:
    """0.97 of 16 tokens keeps ceil(15.52) = 16 tokens: the dense DiT block, router skipped (even if it is NaN)."""
    cfg = small_model.config
    block = small_model.blocks[0]
    torch.manual_seed(0)
    x, c = torch.randn(2, cfg.num_tokens, cfg.hidden_size), torch.randn(2, cfg.hidden_size)
    assert tokens_kept(0.97, cfg.num_tokens) == cfg.num_tokens
    with torch.no_grad():
        dense = block(x, c, BlockChoice(8, 512, 1.0))
        for p in block.token_router.parameters():
            p.fill_(float("nan"))
        out = block(x, c, BlockChoice(8, 512, 0.97))
        partial = block(x, c, BlockChoice(8, 512, 0.9))  # 15 tokens: uses the (NaN) router
    torch.testing.assert_close(out, dense, atol=0, rtol=0)
    assert not torch.isfinite(partial).all()


def test_token_selection_in_the_model(tiny_model, tiny_config) -> None:
    """Through the whole model: a ratio < 1 changes the output, ratio 1 in a Subnet equals the full model."""
    x, t, y = model_inputs(tiny_config, batch=2, seed=7)
    with torch.no_grad():
        full = tiny_model(x, t, y)
        half = tiny_model(x, t, y, subnet=Subnet.uniform(tiny_config, token_ratio=0.5))
        one = tiny_model(x, t, y, subnet=Subnet.uniform(tiny_config, token_ratio=1.0))
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() > 1e-3
    torch.testing.assert_close(one, full, atol=0, rtol=0)


def test_router_gets_gradients_in_training(tiny_model, tiny_config) -> None:
    tiny_model.train()
    x, t, y = model_inputs(tiny_config, batch=2, seed=8)
    out = tiny_model(x, t, y, subnet=Subnet.uniform(tiny_config, token_ratio=0.5), label_dropout=False)
    (out**2).mean().backward()
    for block in tiny_model.blocks:
        g = block.token_router.fc1.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        assert block.token_router.fc2.weight.grad.abs().sum() > 0
    assert tiny_model.pos_embed.grad is None  # frozen


def test_router_gets_no_gradient_at_ratio_one(tiny_model, tiny_config) -> None:
    tiny_model.train()
    x, t, y = model_inputs(tiny_config, batch=2, seed=8)
    out = tiny_model(x, t, y, label_dropout=False)
    (out**2).mean().backward()
    assert all(b.token_router.fc1.weight.grad is None for b in tiny_model.blocks)
    assert tiny_model.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# 7. Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [4.0, 1.5, 1.0])
def test_forward_with_cfg_guides_all_eps_channels(small_model, small_config, scale: float) -> None:
    cfg = small_config
    assert cfg.in_channels == 4 and cfg.out_channels == 8
    x, t, y = model_inputs(cfg, batch=2, seed=9)
    null = torch.full_like(y, cfg.num_classes)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    with torch.no_grad():
        out = small_model.forward_with_cfg(xx, tt, yy, scale)
        cond = small_model(x, t, y)
        uncond = small_model(x, t, null)
    assert out.shape == (4, 8, cfg.input_size, cfg.input_size)
    guided = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(out[:2, :4], guided, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, :4], guided, atol=1e-5, rtol=1e-5)
    # variance channels come straight from the conditional (first half) / unconditional (second half) forward
    torch.testing.assert_close(out[:2, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, 4:], uncond[:, 4:], atol=1e-5, rtol=1e-5)
    if scale == 1.0:
        torch.testing.assert_close(out[:2], cond, atol=1e-5, rtol=1e-5)
    else:
        # the 4th latent channel (index 3) is guided too, not passed through
        assert (out[:2, 3] - cond[:, 3]).abs().max() > 1e-3


def test_forward_with_cfg_ignores_train_mode_dropout_and_second_half_inputs(small_config) -> None:
    cfg = small_config.replace(class_dropout_prob=0.9)
    model = make_model(cfg, seed=1).train()
    x, t, y = model_inputs(cfg, batch=2, seed=10)
    null = torch.full_like(y, cfg.num_classes)
    yy = torch.cat([y, null])
    with torch.no_grad():
        a = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), yy, 3.0)
        b = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), yy, 3.0)
        # the second half of x is replaced by the first half (as in DiT)
        c = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), yy, 3.0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Label embedder
# ---------------------------------------------------------------------------------------------------------------------
def test_label_embedder_table_and_forced_drop() -> None:
    torch.manual_seed(0)
    emb = LabelEmbedder(10, 8, 0.1)
    assert emb.embedding_table.weight.shape == (11, 8)
    labels = torch.tensor([0, 3, 9, 5])
    table = emb.embedding_table.weight
    out = emb(labels, train=False)
    torch.testing.assert_close(out, table[labels], atol=0, rtol=0)
    forced = emb(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    torch.testing.assert_close(forced, table[torch.tensor([10, 3, 10, 5])], atol=0, rtol=0)
    forced_train = emb(labels, train=True, force_drop_ids=torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(forced_train, table[10].expand(4, 8), atol=0, rtol=0)
    # no null row without dropout
    assert LabelEmbedder(10, 8, 0.0).embedding_table.weight.shape == (10, 8)


def test_label_embedder_dropout_rate() -> None:
    torch.manual_seed(0)
    emb = LabelEmbedder(10, 4, 1.0)
    labels = torch.randint(0, 10, (64,))
    assert torch.equal(emb.token_drop(labels), torch.full_like(labels, 10))
    emb = LabelEmbedder(10, 4, 0.5)
    labels = torch.randint(0, 10, (4000,))
    dropped = (emb.token_drop(labels) == 10).float().mean().item()
    assert 0.45 < dropped < 0.55
    kept = emb.token_drop(labels)
    assert torch.equal(kept[kept != 10], labels[kept != 10])  # kept labels are unchanged
    # eval: no dropout at all
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table.weight[labels], atol=0, rtol=0)


def test_model_label_dropout_flag(small_config) -> None:
    cfg = small_config.replace(class_dropout_prob=0.5)
    model = make_model(cfg, seed=4)
    x, t, y = model_inputs(cfg, batch=16, seed=11)
    with torch.no_grad():
        ref = model(x, t, y)  # eval: no dropout
        model.train()
        a = model(x, t, y, label_dropout=False)
        b = model(x, t, y, label_dropout=False)
        torch.manual_seed(123)
        dropped = model(x, t, y)  # train mode default: label dropout on
        null = model(x, t, torch.full_like(y, cfg.num_classes), label_dropout=False)
        model.eval()
        torch.manual_seed(321)
        forced_on = model(x, t, y, label_dropout=True)
    torch.testing.assert_close(a, ref, atol=0, rtol=0)
    torch.testing.assert_close(b, ref, atol=0, rtol=0)
    per_sample_null = [torch.allclose(dropped[i], null[i], atol=1e-6) for i in range(16)]
    per_sample_ref = [torch.allclose(dropped[i], ref[i], atol=1e-6) for i in range(16)]
    # each sample is exactly one of the two
    assert all(n != r for n, r in zip(per_sample_null, per_sample_ref, strict=True))
    assert 0 < sum(per_sample_null) < 16
    # label_dropout=True forces dropout even in eval mode
    forced_null = [torch.allclose(forced_on[i], null[i], atol=1e-6) for i in range(16)]
    forced_ref = [torch.allclose(forced_on[i], ref[i], atol=1e-6) for i in range(16)]
    assert all(n != r for n, r in zip(forced_null, forced_ref, strict=True))
    assert 0 < sum(forced_null) < 16


# ---------------------------------------------------------------------------------------------------------------------
# 9. complete_model
# ---------------------------------------------------------------------------------------------------------------------
def test_complete_model_runs_full_width(small_model, small_config) -> None:
    x, t, y = model_inputs(small_config, batch=2, seed=12)
    small_sub = Subnet.uniform(small_config, attn_rate=0.25, mlp_rate=0.25, token_ratio=0.5)
    with torch.no_grad():
        full = small_model(x, t, y)
        small_model.set_subnet(small_sub)
        sliced = small_model(x, t, y)
        small_model.complete_model = True
        complete = small_model(x, t, y)
        complete_override = small_model(x, t, y, subnet=small_sub)
    assert (sliced - full).abs().max() > 1e-3
    torch.testing.assert_close(complete, full, atol=0, rtol=0)
    torch.testing.assert_close(complete_override, full, atol=0, rtol=0)
    m2 = DiT(small_config, complete_model=True)
    assert m2.complete_model


# ---------------------------------------------------------------------------------------------------------------------
# 10. round_to_nearest, the head layout and the dynamic layers' slices
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,mult,heads,min_value,expected",
    [
        (1152, 0.5, 16, 1, 576),
        (1152, 1.0, 16, 1, 1152),
        (1152, 0.25, 16, 1, 288),
        (384, 0.25, 6, 1, 128),  # 1.5 heads -> 2 (half-up, not banker's rounding)
        (384, 0.75, 6, 1, 320),  # 4.5 -> 5
        (768, 0.01, 12, 1, 64),  # at least one head
        (768, 0.01, 12, 3, 192),  # min_value is in heads
        (768, 0.5, 12, 8, 512),
        (768, 0.9, 12, 1, 704),  # 10.8 -> 11
        (4608, 0.5, 16, 1, 2304),
        (128, 2.0, 8, 1, 128),  # never above full
    ],
)
def test_round_to_nearest(size, mult, heads, min_value, expected) -> None:
    assert round_to_nearest(size, mult, heads, min_value) == expected


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.15625, 0.25, 0.40625, 0.5, 0.5625, 0.75, 0.9, 1.0])
def test_rates_round_like_width_mult(rate) -> None:
    """One rounding: a subnet's heads and MLP width at a rate are what round_to_nearest gives the layers."""
    for name in ("DiT-XL/2", "DiT-S/2", "DiT-T/2"):
        cfg = get_config(name)
        assert rate_to_heads(cfg, rate) * cfg.head_dim == round_to_nearest(cfg.hidden_size, rate, cfg.num_heads)
        assert rate_to_mlp_hidden(cfg, rate) == round_to_nearest(cfg.mlp_hidden, rate, cfg.mlp_groups)
        lin = DynaLinear(cfg.mlp_hidden, cfg.hidden_size, dyna_dim=(True, False), num_groups=cfg.mlp_groups)
        lin.width_mult = rate
        assert lin.active_sizes() == (rate_to_mlp_hidden(cfg, rate), cfg.hidden_size)


def test_head_layout_helpers() -> None:
    """[q | k | v] rows, each H heads of d rows; the first heads and permutations keep q, k and v aligned."""
    H, d, D = 4, 3, 5
    rows = torch.arange(3 * H * d * D, dtype=torch.float32).reshape(3 * H * d, D)
    assert torch.equal(qkv_heads(rows, H), rows.view(3, H, d, D))
    assert torch.equal(qkv_rows(qkv_heads(rows, H)), rows)
    assert first_qkv_heads(rows, H, H) is rows
    assert torch.equal(first_qkv_heads(rows, H, 2), rows.view(3, H, d, D)[:, :2].reshape(3 * 2 * d, D))
    bias = torch.arange(3 * H * d, dtype=torch.float32)
    assert torch.equal(first_qkv_heads(bias, H, 1), bias.view(3, H, d)[:, :1].reshape(-1))
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(permute_qkv_heads(rows, order), rows.view(3, H, d, D)[:, order].reshape(3 * H * d, D))
    proj = torch.arange(D * H * d, dtype=torch.float32).reshape(D, H * d)
    assert torch.equal(proj_heads(proj, H), proj.view(D, H, d))
    assert torch.equal(permute_proj_heads(proj, order), proj.view(D, H, d)[:, order].reshape(D, H * d))
    qkv = torch.randn(2, 7, 3 * H * d)
    assert torch.equal(split_qkv(qkv, H), qkv.reshape(2, 7, 3, H, d).permute(2, 0, 3, 1, 4))
    out = torch.randn(2, H, 7, d)
    assert torch.equal(merge_heads(out), out.transpose(1, 2).reshape(2, 7, H * d))


def test_the_head_layout_is_written_once() -> None:
    """Only model/heads.py rearranges q/k/v or projection rows into heads; every other module calls it."""
    package = Path(dynasearch.__file__).parent
    writers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py") if re.search(r"three h d|\(h d\)", p.read_text())
    )
    assert writers == ["model/heads.py"]


@pytest.mark.parametrize("dyna_dim,expect",
                         [((True, False), (8, 12)), ((False, True), (16, 6)), ((True, True), (8, 6))])
def test_dyna_linear_width_mult_and_to_static(dyna_dim, expect) -> None:
    torch.manual_seed(0)
    lin = randomize_(DynaLinear(16, 12, dyna_dim=dyna_dim, num_groups=4))
    lin.width_mult = 0.5
    n_in, n_out = expect
    assert lin.active_sizes() == expect
    x = torch.randn(3, 5, n_in)
    with torch.no_grad():
        out = lin(x)
        manual = x @ lin.weight[:n_out, :n_in].T + lin.bias[:n_out]
        static = lin.to_static()
        assert isinstance(static, torch.nn.Linear) and static.weight.shape == (n_out, n_in)
        # the copy is a DynaLinear of the slice's size: full width at width_mult 1, groups of the same size
        assert isinstance(static, DynaLinear) and static.dyna_dim == dyna_dim and static.num_groups == 2
        assert (static.in_features_max, static.out_features_max, static.width_mult) == (n_in, n_out, 1.0)
        assert static.weight.is_contiguous() and static.weight.requires_grad
        torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(static(x), out, atol=0, rtol=0)
        # to_static copies (no aliasing with the supernet weight)
        static.weight.add_(1.0)
        torch.testing.assert_close(lin(x), out, atol=0, rtol=0)
    # explicit sizes take precedence over width_mult
    assert lin.active_sizes(4, 3) == (4, 3)
    lin.width_mult = 1.0
    assert lin.active_sizes() == (16, 12)


def test_dyna_qkv_keeps_first_heads_of_q_k_v() -> None:
    torch.manual_seed(0)
    H, d, D = 4, 8, 32
    qkv = randomize_(DynaQKVLinear(D, H, d))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        full = qkv(x)  # (3, B, H, N, d)
        assert full.shape == (3, 2, H, 5, d)
        # full layout == timm's reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        timm = F.linear(x, qkv.weight, qkv.bias).reshape(2, 5, 3, H, d).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(full, timm, atol=0, rtol=0)
        for h in (1, 2, 3):
            w = qkv.weight.view(3, H, d, D)[:, :h].reshape(3 * h * d, D)
            b = qkv.bias.view(3, H, d)[:, :h].reshape(3 * h * d)
            manual = F.linear(x, w, b).reshape(2, 5, 3, h, d).permute(2, 0, 3, 1, 4)
            out = qkv(x, h)
            assert out.shape == (3, 2, h, 5, d)
            torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out, full[:, :, :h], atol=1e-6, rtol=1e-6)
            static = qkv.to_static(h)
            assert isinstance(static, DynaQKVLinear) and static.num_heads == h and static.head_dim == d
            assert static.weight.shape == (3 * h * d, D)
            torch.testing.assert_close(static.weight, w, atol=0, rtol=0)
            torch.testing.assert_close(static.bias, b, atol=0, rtol=0)
            torch.testing.assert_close(F.linear(x, static.weight, static.bias), F.linear(x, w, b), atol=0, rtol=0)
            torch.testing.assert_close(static(x), F.linear(x, w, b).reshape(2, 5, 3, h, d).permute(2, 0, 3, 1, 4),
                                       atol=0, rtol=0)
            static.weight.add_(1.0)  # a copy: the supernet's weight is untouched
            torch.testing.assert_close(qkv(x, h), out, atol=0, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_mlp_and_block_to_static_compute_their_slice(small_model, qk_norm) -> None:
    """Each dynamic layer's static copy is a layer of the slice's size computing exactly the sliced forward."""
    torch.manual_seed(0)
    D, H = 32, 4
    attn = randomize_(Attention(D, H, qk_norm=qk_norm))
    mlp = randomize_(Mlp(D, 128, num_groups=4))
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        for heads in (1, 3, 4):
            static = attn.to_static(heads)
            assert static.num_heads == heads and static.qk_norm == qk_norm and static.proj.num_groups == heads
            assert static.qkv.weight.shape == (3 * heads * 8, D) and static.proj.weight.shape == (D, heads * 8)
            torch.testing.assert_close(static(x), attn(x, heads), atol=0, rtol=0)
        for hidden in (32, 96, 128):
            static = mlp.to_static(hidden)
            assert static.hidden == hidden and static.group_size == mlp.group_size == 32
            assert static.fc1.weight.shape == (hidden, D) and static.fc2.weight.shape == (D, hidden)
            torch.testing.assert_close(static(x), mlp(x, hidden), atol=0, rtol=0)
        block = small_model.blocks[1]
        c = torch.randn(2, 128)
        xb = torch.randn(2, 16, 128)
        for choice in (BlockChoice(3, 192, 1.0), BlockChoice(8, 512, 0.5), BlockChoice(1, 64, 0.25)):
            static = block.to_static(choice)
            assert static.attn.num_heads == choice.heads and static.mlp.hidden == choice.mlp_hidden
            assert static.choice == choice
            torch.testing.assert_close(static(xb, c), block(xb, c, choice), atol=0, rtol=0)
    # static copies are built hollow (meta device) and filled with copies: they draw no random numbers
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    block.to_static(BlockChoice(2, 128, 1.0))
    assert torch.equal(torch.rand(1), expected)


def test_permute_heads_and_channels_keep_the_function() -> None:
    torch.manual_seed(0)
    attn = randomize_(Attention(32, 4))
    mlp = randomize_(Mlp(32, 128, num_groups=4))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        a, m = attn(x), mlp(x)
        v = attn.qkv.weight.view(3, 4, 8, 32)[2].clone()
        order = torch.tensor([3, 1, 0, 2])
        attn.permute_heads(order)
        mlp.permute_channels(torch.randperm(128))
        torch.testing.assert_close(attn(x), a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mlp(x), m, atol=1e-5, rtol=1e-5)
        assert torch.equal(attn.qkv.weight.view(3, 4, 8, 32)[2], v[order])


# ---------------------------------------------------------------------------------------------------------------------
# 11. Position embedding
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(32, 4), (128, 8), (1152, 16)])
def test_pos_embed_values(dim: int, grid: int) -> None:
    pe = get_2d_sincos_pos_embed(dim, grid)
    assert pe.shape == (grid * grid, dim)
    assert pe.min() >= -1.0 and pe.max() <= 1.0
    q = dim // 4
    np.testing.assert_array_equal(pe[0], np.array(([0.0] * q + [1.0] * q) * 2))
    np.testing.assert_allclose(pe, ref_pos_embed(dim, grid), atol=1e-7)
    # token 1 is (row 0, col 1): the first half (column coordinate) changes, the second half (row) does not
    np.testing.assert_array_equal(pe[1, dim // 2 :], pe[0, dim // 2 :])
    assert np.abs(pe[1, : dim // 2] - pe[0, : dim // 2]).max() > 0.1
    # token `grid` is (row 1, col 0)
    np.testing.assert_array_equal(pe[grid, : dim // 2], pe[0, : dim // 2])
    np.testing.assert_allclose(pe[grid, dim // 2], math.sin(1.0), atol=1e-7)


def test_model_pos_embed_is_fixed(tiny_model, tiny_config) -> None:
    assert not tiny_model.pos_embed.requires_grad
    expected = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float().unsqueeze(0)
    torch.testing.assert_close(tiny_model.pos_embed.detach(), expected, atol=1e-7, rtol=0)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert "pos_embed" not in trainable and len(trainable) == len(list(tiny_model.parameters())) - 1


# ---------------------------------------------------------------------------------------------------------------------
# 12. Bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError) as info:
        get_config("DiT-XXL/2")
    msg = str(info.value)
    assert "DiT-XXL/2" in msg
    for name in DIT_CONFIGS:
        assert name in msg
    assert isinstance(info.value, DynasearchError)


def test_invalid_configs() -> None:
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=100, num_heads=16)
    with pytest.raises(ConfigError, match="hidden_size 100 is not divisible by num_heads 6"):
        DiTConfig(name="DiT-S/2", hidden_size=100, depth=12, num_heads=6)
    with pytest.raises(ConfigError, match="input_size 30 is not divisible by patch_size 4"):
        get_config("DiT-S/4", input_size=30)
    with pytest.raises(ConfigError, match="depth"):
        get_config("DiT-S/2", depth=0)
    with pytest.raises(ConfigError, match="in_channels"):
        get_config("DiT-S/2", in_channels=2.5)
    with pytest.raises(ConfigError, match="class_dropout_prob"):
        get_config("DiT-S/2", class_dropout_prob=1.0)
    with pytest.raises(ConfigError, match="block_heads has 3 entries for 12 blocks"):
        get_config("DiT-S/2", block_heads=(1, 2, 3))
    with pytest.raises(ConfigError, match="bogus"):
        get_config("DiT-S/2", bogus=1)
    with pytest.raises(ConfigError, match="bogus"):
        get_config("DiT-S/2").replace(bogus=1)


@pytest.mark.parametrize(
    "changes",
    [
        {"block_heads": (8, 4)},  # more heads than the 4-head supernet: accepted, DiT builds an 8-head block
        {"block_heads": (0, 4)},  # accepted; DiT(...) then raises SubnetError "heads must be ... in [1, 0]"
        {"block_heads": (2.5, 4)},  # accepted; DiT(...) then raises a raw TypeError from torch.empty
        {"block_mlp_hidden": (256, 128)},  # wider than the supernet's MLP (128): accepted, DiT builds it
        {"block_mlp_hidden": (100, 128)},  # not a multiple of the group size 32: accepted (see the next test)
        {"block_token_ratios": (0.0, 1.0)},  # accepted; DiT(...) then raises SubnetError
        {"block_token_ratios": (1.5, 1.0)},  # accepted; DiT(...) then raises SubnetError
    ],
)
def test_config_rejects_impossible_physical_sizes(tiny_config, changes) -> None:
    with pytest.raises(ConfigError):
        tiny_config.replace(**changes)


def test_config_from_dict_rejects_fractional_heads(tiny_config) -> None:
    data = tiny_config.to_dict()
    data["block_heads"] = [2.7, 4]
    with pytest.raises(ConfigError):
        DiTConfig.from_dict(data)


def test_block_with_physical_mlp_width_accepts_masks(tiny_config) -> None:
    with pytest.raises(ConfigError, match="multiple of 32"):
        tiny_config.replace(block_mlp_hidden=(100, 128))
    model = make_model(tiny_config.replace(block_mlp_hidden=(96, 128)))
    block = model.blocks[0]
    torch.manual_seed(0)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        out = block(x, c, BlockChoice(4, 64, 1.0), mlp_mask=torch.ones(2, 3))
        torch.testing.assert_close(out, block(x, c, BlockChoice(4, 64, 1.0)), atol=0, rtol=0)


@pytest.mark.parametrize("field,value", [("depth", 3), ("hidden_size", 100), ("num_heads", 5), ("patch_size", 4)])
def test_get_config_architecture_override_is_applied_or_a_config_error(field, value) -> None:
    """get_config(name, depth=3) must either apply the override (and validate it) or raise ConfigError; a raw
    TypeError escapes the CLI's DynasearchError handling and is reported as an internal error."""
    try:
        cfg = get_config("DiT-S/2", **{field: value})
    except ConfigError:
        return
    assert getattr(cfg, field) == value


def test_config_dict_round_trip_and_unknown_key() -> None:
    cfg = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10).replace(
        block_heads=(2, 4), block_mlp_hidden=(64, 128), block_token_ratios=(0.5, 1.0)
    )
    back = DiTConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg and back.block_heads == (2, 4) and hash(back) == hash(cfg)
    data = cfg.to_dict()
    data["wat"] = 3
    data["zzz"] = 1
    with pytest.raises(ConfigError, match="unknown keys: wat, zzz"):
        DiTConfig.from_dict(data)
    with pytest.raises(ConfigError, match="JSON object"):
        DiTConfig.from_dict([1, 2])
    assert cfg.supernet() == get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
