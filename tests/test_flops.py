"""Tests for dynasearch.flops: the closed form equals fvcore exactly (every registry entry, random subnets, per module),
DiT-XL/2's published figure, the attention handler, monotonicity in every rate, parameter counts and budget strings.

Registry entries from DiT-S up are built by `structural_model`: the real `DiT` constructed on the meta device, then
every trainable parameter materialised as a random window into one shared random vector per parameter size. The
module tree, shapes and forward code are exactly those of `DiT(config)`; only the CPU cost of allocating,
initialising and re-randomising up to 675M parameters (about 40 s for XL on two shared cores) is avoided. FLOPs
depend on shapes only; `test_structural_model_counts_like_a_real_model` checks that this construction counts exactly
like `make_model` (DiT + randomize_), which builds the DiT-T/N models here.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn as nn
from conftest import make_model

from dynasearch.cost.flops import (
    _sdpa_flop_handle,
    closed_form_breakdown,
    closed_form_by_module,
    closed_form_flops,
    closed_form_params,
    count_flops,
    format_flops,
    parse_budget,
)
from dynasearch.errors import BudgetError, DynasearchError
from dynasearch.model import (
    DIT_CONFIGS,
    DiT,
    DiTConfig,
    get_2d_sincos_pos_embed,
    get_config,
    tokens_kept,
)
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.slicing import slice_subnet

XL2_FLOPS = 118_688_661_504
"""DiT-XL/2 at 32x32x4 latents, 1000 classes, batch 1 (DiT paper: ~118.6 GFLOPs; DyDiT reports 118.69)."""
XL2_PARAMS = 675_129_632
"""Parameters of the original DiT-XL/2 (facebookresearch/DiT, pos_embed included)."""

ELEMENTWISE_OPS = {
    "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::div", "aten::neg",
    "aten::exp", "aten::cos", "aten::sin", "aten::silu", "aten::gelu", "aten::relu", "aten::sigmoid",
    "aten::embedding",  # a table lookup: no multiply-adds
    "aten::topk", "aten::gather", "aten::scatter_add", "aten::expand", "aten::squeeze", "aten::unsqueeze",
}
"""Ops fvcore may skip: element-wise arithmetic and index manipulation, none of them a multiply-add."""
MATMUL_LIKE = ("matmul", "mm", "linear", "conv", "einsum", "scaled_dot_product", "attention", "layer_norm", "addmm")




# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def structural_model(config: DiTConfig, seed: int = 0) -> DiT:
    """`DiT(config)` built on the meta device, then every trainable parameter a random contiguous CPU view (eval mode).

    Parameters of one size are windows at random offsets into one shared random vector (std 1/sqrt(fan_in) for
    matrices, 0.1 for vectors): non-zero, different in every block, contiguous (fast matmuls), and XL costs
    ~100 MB instead of 2.7 GB. pos_embed is the real fixed sin-cos table.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = DiT(config)
    pools: dict[tuple[int, int], torch.Tensor] = {}
    spread = 4096
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if not p.requires_grad:  # pos_embed
                value = torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)).float()[None]
            else:
                fan_in = p[0].numel() if p.dim() >= 2 else 100
                key = (p.numel(), fan_in)
                if key not in pools:
                    pools[key] = torch.randn(p.numel() + spread, generator=gen) / math.sqrt(fan_in)
                offset = int(torch.randint(0, spread, (1,), generator=gen))
                value = pools[key][offset : offset + p.numel()].view(tuple(p.shape))
            module._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
    assert not list(model.buffers()) and all(p.device.type == "cpu" for p in model.parameters())
    return model.eval()


def random_subnet(config: DiTConfig, rng: random.Random, ratios=(0.25, 0.5, 0.75, 1.0)) -> Subnet:
    """Random heads, MLP width (whole groups) and token ratio in every block of a supernet config."""
    group = config.mlp_group_size
    return Subnet(
        tuple(
            BlockChoice(
                rng.randint(1, config.num_heads),
                group * rng.randint(1, config.mlp_hidden // group),
                rng.choice(ratios) if config.token_selection else 1.0,
            )
            for _ in range(config.depth)
        )
    )


def router_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".token_router." in n)


def assert_by_module_equal(config: DiTConfig, subnet: Subnet | None, batch: int, counted) -> None:
    """fvcore == closed form for the total and for every module key of the closed form (every tree level)."""
    closed = closed_form_by_module(config, subnet, batch)
    assert counted.total == closed[""] == closed_form_flops(config, subnet, batch)
    mismatched = {k: (counted.by_module.get(k), v) for k, v in closed.items() if counted.by_module.get(k) != v}
    assert not mismatched, f"fvcore vs closed form differ at {mismatched}"
    # and fvcore counts nothing the closed form does not know about
    assert sum(counted.by_module.get(k, 0) for k in closed if k.count(".") == 0 and k) == counted.total


def assert_only_elementwise_skipped(counted) -> None:
    skipped = set(counted.skipped_ops)
    assert not any(any(word in op for word in MATMUL_LIKE) for op in skipped), skipped
    assert skipped <= ELEMENTWISE_OPS, skipped - ELEMENTWISE_OPS


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures (module-scoped: every model is built once)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl2_config() -> DiTConfig:
    return get_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)


@pytest.fixture(scope="module")
def xl2_model(xl2_config):
    with torch.no_grad():
        return structural_model(xl2_config)


@pytest.fixture(scope="module")
def xl2_count(xl2_model):
    with torch.no_grad():
        return count_flops(xl2_model)


@pytest.fixture(scope="module")
def t2_model() -> DiT:
    return make_model(get_config("DiT-T/2", input_size=16, in_channels=4, num_classes=10), seed=3)


@pytest.fixture(scope="module")
def t2_qk_model() -> DiT:
    return make_model(get_config("DiT-T/2", input_size=16, in_channels=4, num_classes=10, qk_norm=True), seed=4)


@pytest.fixture(scope="module")
def s2_model() -> DiT:
    return structural_model(get_config("DiT-S/2", input_size=16, in_channels=4, num_classes=10), seed=5)


# ---------------------------------------------------------------------------------------------------------------------
# Closed form == fvcore
# ---------------------------------------------------------------------------------------------------------------------
def test_structural_model_counts_like_a_real_model() -> None:
    """The cheap construction used for big registry entries traces exactly like DiT(config) + randomize_."""
    config = get_config("DiT-T/4", input_size=8, in_channels=4, num_classes=10)
    subnet = random_subnet(config, random.Random(0))
    real = make_model(config, seed=0)
    cheap = structural_model(config)
    assert {n: tuple(p.shape) for n, p in real.named_parameters()} == {
        n: tuple(p.shape) for n, p in cheap.named_parameters()
    }
    assert all(p.abs().sum() > 0 for p in cheap.parameters())
    weights = [b.attn.qkv.weight for b in cheap.blocks]
    assert not torch.equal(weights[0], weights[1])  # blocks differ
    with torch.no_grad():
        a, b = count_flops(real, subnet), count_flops(cheap, subnet)
        out = cheap(*_inputs(config), subnet=subnet)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert (a.total, a.by_module, a.by_operator, a.skipped_ops) == (b.total, b.by_module, b.by_operator, b.skipped_ops)


def _inputs(config: DiTConfig, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=gen)
    return x, torch.rand(batch, generator=gen) * 999, torch.randint(0, config.num_classes, (batch,), generator=gen)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("DiT-XL") else n for n in DIT_CONFIGS]
)
def test_closed_form_equals_fvcore_on_every_registry_entry(name: str, request) -> None:
    if name == "DiT-XL/2":  # the module's XL/2 model at its published size: built and counted once
        config, counted = request.getfixturevalue("xl2_config"), request.getfixturevalue("xl2_count")
    else:
        patch = DIT_CONFIGS[name]["patch_size"]
        config = get_config(name, input_size=4 * patch, in_channels=4, num_classes=1000)
        with torch.no_grad():
            model = structural_model(config) if config.hidden_size >= 384 else make_model(config)
            counted = count_flops(model)
        del model
    assert_by_module_equal(config, None, 1, counted)
    assert_only_elementwise_skipped(counted)
    assert counted.by_operator["scaled_dot_product_attention"] == sum(
        v for k, v in closed_form_breakdown(config).items() if k.endswith(".sdpa")
    )


ODD_RATIOS = (0.1, 0.3, 1 / 3, 0.51, 0.9, 0.99, 1.0)
CASES = [  # (model fixture, seed, batch[, token ratios]): 14 random subnets, batch 2 and qk_norm among them
    *[("t2_model", s, 1) for s in range(4)],
    ("t2_model", 4, 2),
    *[("t2_qk_model", s, 1) for s in range(5, 8)],
    ("t2_qk_model", 8, 2),
    *[("s2_model", s, 1) for s in range(9, 11)],
    ("s2_model", 11, 2),
    ("t2_model", 12, 1, ODD_RATIOS),  # tokens_kept rounds up: ceil(r * N)
    ("t2_qk_model", 13, 2, ODD_RATIOS),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-seed{c[1]}-batch{c[2]}" + ("-odd" if len(c) > 3 else ""))
def test_closed_form_equals_fvcore_on_random_subnets(case: tuple, request) -> None:
    fixture, seed, batch, *ratios = case
    model = request.getfixturevalue(fixture)
    config = model.config
    subnet = random_subnet(config, random.Random(seed), *ratios)
    assert subnet != Subnet.full(config)
    with torch.no_grad():
        counted = count_flops(model, subnet, batch=batch)
    assert_by_module_equal(config, subnet, batch, counted)
    assert_only_elementwise_skipped(counted)
    assert model.subnet == Subnet.full(config)  # counting never changes the active subnet
    assert not model.training
    n = config.num_tokens
    routed = [i for i, b in enumerate(subnet.blocks) if tokens_kept(b.token_ratio, n) < n]
    for i, b in enumerate(subnet.blocks):  # the router is traced exactly where fewer than N tokens pass
        assert (counted.by_module.get(f"blocks.{i}.token_router", 0) > 0) == (i in routed)
        assert counted.by_module[f"blocks.{i}.mlp"] == batch * 2 * math.ceil(b.token_ratio * n - 1e-9) * (
            config.hidden_size * b.mlp_hidden
        )
    assert routed, "no block selected tokens"


def test_closed_form_equals_fvcore_on_a_sliced_model(t2_model) -> None:
    subnet = random_subnet(t2_model.config, random.Random(42))
    small = slice_subnet(t2_model, subnet)
    with torch.no_grad():
        counted = count_flops(small)
    assert counted.total == closed_form_flops(small.config) == closed_form_flops(t2_model.config, subnet)
    assert_by_module_equal(small.config, None, 1, counted)


def test_count_flops_restores_training_mode(t2_model) -> None:
    t2_model.train()
    try:
        with torch.no_grad():
            counted = count_flops(t2_model, Subnet.uniform(t2_model.config, 0.5, 0.5, 0.5))
        assert t2_model.training
    finally:
        t2_model.eval()
    assert counted.total == closed_form_flops(t2_model.config, Subnet.uniform(t2_model.config, 0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# DiT-XL/2: the published figure
# ---------------------------------------------------------------------------------------------------------------------
def test_dit_xl2_flops_published_figure(xl2_config, xl2_count) -> None:
    assert closed_form_flops(xl2_config) == XL2_FLOPS
    assert xl2_count.total == XL2_FLOPS
    assert format_flops(XL2_FLOPS) == "118.69G"
    assert closed_form_flops(xl2_config, batch=2) == 2 * XL2_FLOPS


def test_dit_xl2_fvcore_skips_no_matmul(xl2_count) -> None:
    skipped = xl2_count.skipped_ops
    assert "aten::scaled_dot_product_attention" not in skipped
    assert_only_elementwise_skipped(xl2_count)
    assert set(skipped) <= {
        "aten::mul", "aten::mul_", "aten::add", "aten::div", "aten::exp", "aten::cos", "aten::sin",
        "aten::silu", "aten::gelu", "aten::embedding",
    }, skipped
    # and the counted operators are exactly the matmuls, attention and the LayerNorms
    assert set(xl2_count.by_operator) == {"conv", "linear", "scaled_dot_product_attention", "layer_norm"}


def test_dit_xl2_params(xl2_config, xl2_model) -> None:
    total = sum(p.numel() for p in xl2_model.parameters())
    assert closed_form_params(xl2_config, routers=False) == XL2_PARAMS == total - router_params(xl2_model)
    assert closed_form_params(xl2_config) == total
    assert router_params(xl2_model) == 28 * (1152 * 144 + 144 + 144 + 1)


# ---------------------------------------------------------------------------------------------------------------------
# The attention handler
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_part_of_a_block_is_2_n2_heads_head_dim(t2_model, batch: int) -> None:
    config = t2_model.config
    n, hd = config.num_tokens, config.head_dim
    heads = [1, 8, 3, 5, 2, 7]
    subnet = Subnet(tuple(BlockChoice(h, config.mlp_hidden, 1.0) for h in heads))
    with torch.no_grad():
        counted = count_flops(t2_model, subnet, batch=batch)
    m = counted.by_module
    for i, h in enumerate(heads):
        attn = m[f"blocks.{i}.attn"] - m[f"blocks.{i}.attn.qkv"] - m[f"blocks.{i}.attn.proj"]
        assert attn == batch * 2 * n * n * h * hd, i
        assert m[f"blocks.{i}.attn.qkv"] == batch * n * config.hidden_size * 3 * h * hd
    assert counted.by_operator["scaled_dot_product_attention"] == batch * 2 * n * n * hd * sum(heads)


def test_sdpa_handler_on_cross_attention_shapes() -> None:
    """q (B,H,Lq,d), k (B,H,Lk,d), v (B,H,Lk,dv): Lq*Lk*d for q k^T plus Lq*Lk*dv for attn v, per batch and head."""
    from fvcore.nn import FlopCountAnalysis

    class Cross(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    analysis = FlopCountAnalysis(Cross(), (q, k, v)).unsupported_ops_warnings(False)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
    assert analysis.total() == 2 * 3 * (5 * 7 * 8 + 5 * 7 * 4)


# ---------------------------------------------------------------------------------------------------------------------
# Monotonicity (DiT-S/2 at its real size; closed form == fvcore is established above)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["attn", "mlp", "token"])
@pytest.mark.parametrize("others", [1.0, 0.5, 0.25])
def test_flops_monotone_in_each_uniform_rate(which: str, others: float) -> None:
    """Strictly increasing whenever the rate changes the choice. Token ratios are checked below 1: at 1.0 the
    router is not run at all, a discontinuity checked exactly in `test_token_ratio_one_drops_the_router`."""
    config = get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    grid = [k / 24 for k in range(1, 25 if which != "token" else 24)]
    key = {"attn": "attn_rate", "mlp": "mlp_rate", "token": "token_ratio"}[which]
    subnets = [Subnet.uniform(config, **{"attn_rate": others, "mlp_rate": others, "token_ratio": others, key: r})
               for r in grid]
    values = [closed_form_flops(config, s) for s in subnets]
    for a, b, sa, sb in zip(values, values[1:], subnets, subnets[1:], strict=False):
        if sa == sb:
            assert a == b
        else:
            assert b > a, (which, others, sa.blocks[0], sb.blocks[0])
    assert len(set(values)) >= {"attn": 6, "mlp": 6, "token": 23}[which]  # the grid really moved the choice


@pytest.mark.parametrize("seed", range(5))
def test_flops_monotone_in_one_block(seed: int) -> None:
    """Growing one block's heads, MLP groups or token ratio (< 1; all else fixed) strictly increases FLOPs."""
    config = get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    rng = random.Random(seed)
    base = random_subnet(config, rng)
    i = rng.randrange(config.depth)
    n = config.num_tokens
    for field, values in (
        ("heads", range(1, config.num_heads + 1)),
        ("mlp_hidden", range(config.mlp_group_size, config.mlp_hidden + 1, config.mlp_group_size)),
        ("token_ratio", [k / n for k in range(1, n)]),
    ):
        flops = []
        for v in values:
            blocks = list(base.blocks)
            blocks[i] = BlockChoice(**{**blocks[i].to_dict(), field: v})
            flops.append(closed_form_flops(config, Subnet(tuple(blocks))))
        assert all(b > a for a, b in itertools.pairwise(flops)), field


@pytest.mark.parametrize("mlp_rate", [1.0, 0.5, 0.25])
def test_token_ratio_one_drops_the_router(mlp_rate: float) -> None:
    """From k < N tokens to all N: + 2*(N-k)*D*M for the MLP, - N*(D*r + r) for the router no longer run."""
    config = get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    n, d, r = config.num_tokens, config.hidden_size, config.router_hidden
    m = Subnet.uniform(config, mlp_rate=mlp_rate).blocks[0].mlp_hidden
    below = Subnet.uniform(config, mlp_rate=mlp_rate, token_ratio=23 / 24)
    k = tokens_kept(23 / 24, n)
    step = closed_form_flops(config, Subnet.uniform(config, mlp_rate=mlp_rate)) - closed_form_flops(config, below)
    assert step == config.depth * (2 * (n - k) * d * m - n * (d * r + r))


def test_token_ratio_costs_the_router_but_saves_mlp_tokens() -> None:
    config = get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    full = closed_form_breakdown(config)
    half = closed_form_breakdown(config, Subnet.uniform(config, token_ratio=0.5))
    n, d, r = config.num_tokens, config.hidden_size, config.router_hidden
    assert "blocks.0.token_router" not in full
    assert half["blocks.0.token_router"] == n * (d * r + r)
    assert half["blocks.0.mlp"] * 2 == full["blocks.0.mlp"] == 2 * n * d * config.mlp_hidden
    assert tokens_kept(0.5, n) == n // 2


# ---------------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_norm": True}, {"token_selection": False}, {"class_dropout_prob": 0.0, "learn_sigma": False}],
    ids=["plain", "qk_norm", "no_routers", "no_null_class"],
)
def test_closed_form_params_equals_sliced_model(overrides: dict) -> None:
    config = get_config("DiT-T/2", input_size=8, in_channels=4, num_classes=10, **overrides)
    model = make_model(config, seed=2)
    assert closed_form_params(config) == sum(p.numel() for p in model.parameters())
    rng = random.Random(7)
    for _ in range(4):
        subnet = random_subnet(config, rng)
        small = slice_subnet(model, subnet)
        total = sum(p.numel() for p in small.parameters())
        assert closed_form_params(config, subnet) == total == closed_form_params(small.config)
        assert closed_form_params(config, subnet, routers=False) == total - router_params(small)
        assert total < sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Budget strings and formatting
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,full,expected",
    [
        ("50G", None, 50 * 10**9),
        ("50GFLOPs", None, 50 * 10**9),
        ("50 GFLOPs", None, 50 * 10**9),
        ("5e10", None, 50 * 10**9),
        ("500M", None, 500 * 10**6),
        ("0.5x", 100, 50),
        ("50%", 100, 50),
        ("1.5T", None, 1_500_000_000_000),
        ("118.69G", None, 118_690_000_000),
        ("12k", None, 12_000),
        ("0.25x", XL2_FLOPS, XL2_FLOPS // 4),
        ("100%", XL2_FLOPS, XL2_FLOPS),
    ],
)
def test_parse_budget(text: str, full, expected: int) -> None:
    value = parse_budget(text, full)
    assert value == expected and isinstance(value, int)


@pytest.mark.parametrize("text,full", [("50X", None), ("-1G", None), ("0", None), ("abc", None), ("", None),
                                       ("0.5x", None), ("50%", None), ("1e400", None), ("0G", None), ("5 0G", None),
                                       ("0x", 100)])
def test_parse_budget_errors(text: str, full) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(text, full)
    assert isinstance(info.value, DynasearchError)
    assert f"'{text}'" in str(info.value)


def test_parse_budget_rejects_non_strings() -> None:
    with pytest.raises(BudgetError, match="50"):
        parse_budget(50)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "flops,text", [(XL2_FLOPS, "118.69G"), (1.5e12, "1.50T"), (6_065_504_256, "6.07G"), (2_500_000, "2.50M"),
                   (1234, "1.23K"), (999, "999")]
)
def test_format_flops(flops, text: str) -> None:
    assert format_flops(flops) == text
