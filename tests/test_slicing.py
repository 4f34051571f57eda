"""Tests for dynasearch.slicing: a physically sliced model computes exactly what the supernet computes under the
subnet, is physically smaller, round-trips through a checkpoint, slices again; importance re-ordering keeps the full
function and changes what a subnet keeps; a half-width model costs under 0.6x the FLOPs (benchmark printed only)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from conftest import model_inputs, randomize_

from dynasearch.checkpoint.native import load_checkpoint, save_checkpoint
from dynasearch.cost.flops import closed_form_flops
from dynasearch.errors import SubnetError
from dynasearch.model import DiT, DiTConfig, get_2d_sincos_pos_embed, get_config
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.slicing import (
    channel_importance,
    head_importance,
    reorder_by_importance,
    slice_subnet,
    sliced_config,
)

ATOL = 1e-5


def random_subnet(config: DiTConfig, rng: random.Random, max_sizes: Subnet | None = None) -> Subnet:
    """Random heads, MLP groups and token ratio (half from {0.25, 0.5, 0.75, 1}, half uniform) per block."""
    group = config.mlp_group_size
    blocks = []
    for i in range(config.depth):
        max_heads = config.num_heads if max_sizes is None else max_sizes.blocks[i].heads
        max_mlp = config.mlp_hidden if max_sizes is None else max_sizes.blocks[i].mlp_hidden
        ratio = rng.choice([0.25, 0.5, 0.75, 1.0]) if rng.random() < 0.5 else rng.uniform(0.05, 1.0)
        blocks.append(BlockChoice(rng.randint(1, max_heads), group * rng.randint(1, max_mlp // group), ratio))
    return Subnet(tuple(blocks))


def cfg_inputs(config: DiTConfig, batch: int = 4, seed: int = 0):
    """Inputs for forward_with_cfg: the second half carries the null label."""
    x, t, y = model_inputs(config, batch, seed)
    half = batch // 2
    y = torch.cat([y[:half], torch.full((half,), config.num_classes)])
    return torch.cat([x[:half], x[:half]]), torch.cat([t[:half], t[:half]]), y


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def model_at(state: dict[str, torch.Tensor], config: DiTConfig) -> DiT:
    """A DiT of `config` holding `state` (all but pos_embed, which follows the input size): no init, no copy."""
    with torch.device("meta"):
        model = DiT(config)
    pos = torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, config.grid_size)).float()[None]
    state = {**state, "pos_embed": pos}
    model.load_state_dict(state, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Sliced == supernet under the subnet
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(24))
def test_sliced_equals_supernet_under_subnet(tiny_model, seed: int) -> None:
    config = tiny_model.config
    subnet = random_subnet(config, random.Random(seed))
    small = slice_subnet(tiny_model, subnet)
    assert not small.training and small.config.is_sliced
    assert small.subnet == Subnet(
        tuple(BlockChoice(b.heads, b.mlp_hidden, float(b.token_ratio)) for b in subnet.blocks)
    )
    x, t, y = model_inputs(config, batch=3, seed=seed)
    with torch.no_grad():
        expected = tiny_model(x, t, y, subnet=subnet)
        got = small(x, t, y)
        full = tiny_model(x, t, y)
        guided = small.forward_with_cfg(*cfg_inputs(config, 4, seed), cfg_scale=4.0)
        guided_ref = tiny_model.forward_with_cfg(*cfg_inputs(config, 4, seed), cfg_scale=4.0, subnet=subnet)
    assert got.shape == expected.shape == (3, config.out_channels, config.input_size, config.input_size)
    assert max_diff(got, expected) < ATOL
    assert max_diff(guided, guided_ref) < ATOL
    if subnet != Subnet.full(config):  # the comparison is not vacuous: the subnet really computes something else
        assert max_diff(expected, full) > 1e-3
    assert tiny_model.subnet == Subnet.full(config)  # slicing never changes the supernet


def test_sliced_equals_supernet_with_set_subnet(small_model) -> None:
    subnet = random_subnet(small_model.config, random.Random(99))
    small = slice_subnet(small_model, subnet)
    x, t, y = model_inputs(small_model.config, batch=2, seed=1)
    model = copy.deepcopy(small_model)
    model.set_subnet(subnet)
    with torch.no_grad():
        assert max_diff(small(x, t, y), model(x, t, y)) < ATOL


def test_slicing_keeps_training_mode(tiny_model) -> None:
    tiny_model.train()
    small = slice_subnet(tiny_model, Subnet.uniform(tiny_model.config, 0.5, 0.5))
    assert small.training
    tiny_model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Physically smaller; config; checkpoint round trip; nested slicing
# ---------------------------------------------------------------------------------------------------------------------
SUBNET = Subnet((BlockChoice(3, 64, 0.5), BlockChoice(1, 32, 1.0)))  # of DiT-N/2: 4 heads of 8, MLP 128 (groups 32)


def _ints(doc, path="") -> list[tuple[str, int]]:
    """Every integer in a JSON document with its path (bools and floats excluded)."""
    if isinstance(doc, dict):
        return [item for k, v in doc.items() for item in _ints(v, f"{path}.{k}" if path else k)]
    if isinstance(doc, list):
        return [item for i, v in enumerate(doc) for item in _ints(v, f"{path}[{i}]")]
    return [(path, doc)] if isinstance(doc, int) and not isinstance(doc, bool) else []


def test_sliced_model_is_physically_smaller(tiny_model) -> None:
    config = tiny_model.config
    d, hd = config.hidden_size, config.head_dim
    small = slice_subnet(tiny_model, SUBNET)
    state = small.state_dict()
    for i, b in enumerate(SUBNET.blocks):
        pre = f"blocks.{i}."
        assert state[pre + "attn.qkv.weight"].shape == (3 * b.heads * hd, d)
        assert state[pre + "attn.qkv.bias"].shape == (3 * b.heads * hd,)
        assert state[pre + "attn.proj.weight"].shape == (d, b.heads * hd)
        assert state[pre + "mlp.fc1.weight"].shape == (b.mlp_hidden, d)
        assert state[pre + "mlp.fc1.bias"].shape == (b.mlp_hidden,)
        assert state[pre + "mlp.fc2.weight"].shape == (d, b.mlp_hidden)
        assert small.blocks[i].attn.num_heads == b.heads and small.blocks[i].mlp.hidden == b.mlp_hidden
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_model.parameters())
    # the sliced q, k and v are the first heads of each of q, k and v of the supernet
    full_qkv = tiny_model.blocks[0].attn.qkv.weight.reshape(3, config.num_heads, hd, d)
    assert torch.equal(state["blocks.0.attn.qkv.weight"].reshape(3, 3, hd, d), full_qkv[:, :3])


def test_sliced_config_json_has_only_the_physical_sizes(tiny_model, tmp_path) -> None:
    config = tiny_model.config
    small = slice_subnet(tiny_model, SUBNET)
    assert small.config == sliced_config(tiny_model, SUBNET)
    save_checkpoint(small, tmp_path / "ckpt")
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert doc["kind"] == "sliced"
    model = doc["model"]
    assert model["block_heads"] == [3, 1] and model["block_mlp_hidden"] == [64, 32]
    assert model["block_token_ratios"] == [0.5, 1.0]
    assert model["hidden_size"] == config.hidden_size and model["num_heads"] == config.num_heads
    assert doc["subnet"] == SUBNET.to_dict()
    ints = _ints(doc)
    full_sizes = {config.mlp_hidden, 3 * config.hidden_size, config.num_heads}
    assert [(p, v) for p, v in ints if v in full_sizes] == [("model.num_heads", config.num_heads)], ints


def test_sliced_checkpoint_round_trip_identical_outputs(tiny_model, tmp_path) -> None:
    small = slice_subnet(tiny_model, SUBNET)
    save_checkpoint(small, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == small.config and loaded.subnet == small.subnet
    x, t, y = model_inputs(tiny_model.config, batch=3, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), small(x, t, y))
    assert all(torch.equal(a, b)
               for a, b in zip(loaded.state_dict().values(), small.state_dict().values(), strict=True))


@pytest.mark.parametrize("seed", range(4))
def test_nested_slicing_equals_direct_slicing(small_model, seed: int) -> None:
    config = small_model.config
    rng = random.Random(100 + seed)
    outer = random_subnet(config, rng)
    inner = random_subnet(config, rng, max_sizes=outer)
    once = slice_subnet(small_model, outer)
    nested = slice_subnet(once, inner)
    direct = slice_subnet(small_model, inner)
    assert nested.config == direct.config
    ns, ds = nested.state_dict(), direct.state_dict()
    assert ns.keys() == ds.keys() and all(torch.equal(ns[k], ds[k]) for k in ns)
    x, t, y = model_inputs(config, batch=2, seed=seed)
    with torch.no_grad():
        assert max_diff(nested(x, t, y), small_model(x, t, y, subnet=inner)) < ATOL
        # the once-sliced model run under the inner subnet (dynamic slicing of a sliced model) agrees too
        assert max_diff(once(x, t, y, subnet=inner), direct(x, t, y)) < ATOL


def test_slicing_a_sliced_model_beyond_its_sizes_is_refused(tiny_model) -> None:
    small = slice_subnet(tiny_model, SUBNET)
    with pytest.raises(SubnetError, match="block 0"):
        slice_subnet(small, Subnet((BlockChoice(4, 64, 1.0), BlockChoice(1, 32, 1.0))))
    with pytest.raises(SubnetError, match="block 1"):
        slice_subnet(small, Subnet((BlockChoice(1, 32, 1.0), BlockChoice(1, 64, 1.0))))


# ---------------------------------------------------------------------------------------------------------------------
# Importance re-ordering
# ---------------------------------------------------------------------------------------------------------------------
def test_reorder_keeps_the_full_function(small_model) -> None:
    config = small_model.config
    reordered = copy.deepcopy(small_model)
    orders = reorder_by_importance(reordered)
    assert len(orders) == config.depth
    for heads, channels in orders:
        assert sorted(heads.tolist()) == list(range(config.num_heads))
        assert sorted(channels.tolist()) == list(range(config.mlp_hidden))
    assert any(heads.tolist() != list(range(config.num_heads)) for heads, _ in orders)  # something moved
    x, t, y = model_inputs(config, batch=3, seed=2)
    with torch.no_grad():
        assert max_diff(reordered(x, t, y), small_model(x, t, y)) < ATOL
        routed = Subnet.uniform(config, token_ratio=0.5)  # full width with token selection: routers untouched
        assert max_diff(reordered(x, t, y, subnet=routed), small_model(x, t, y, subnet=routed)) < ATOL


def test_reorder_sorts_importance_and_subnets_keep_the_most_important(small_model) -> None:
    config = small_model.config
    hd, d = config.head_dim, config.hidden_size
    before = [(head_importance(b), channel_importance(b)) for b in small_model.blocks]
    reordered = copy.deepcopy(small_model)
    orders = reorder_by_importance(reordered)
    for block, (heads, channels), (h_before, c_before) in zip(reordered.blocks, orders, before, strict=True):
        h_after, c_after = head_importance(block), channel_importance(block)
        assert torch.all(h_after[:-1] >= h_after[1:]) and torch.all(c_after[:-1] >= c_after[1:])
        assert torch.allclose(h_after, h_before[heads]) and torch.allclose(c_after, c_before[channels])
    # idempotent: a second pass finds everything in order
    again = reorder_by_importance(reordered)
    assert all(h.tolist() == list(range(config.num_heads)) for h, _ in again)
    # the half subnet now keeps the most important heads: v rows of kept head j == original head order[j]
    subnet = Subnet.uniform(config, 0.5, 0.5)
    kept = subnet.blocks[0].heads
    sliced_after = slice_subnet(reordered, subnet)
    sliced_before = slice_subnet(small_model, subnet)
    v_after = sliced_after.blocks[0].attn.qkv.weight.reshape(3, kept, hd, d)[2]
    v_full = small_model.blocks[0].attn.qkv.weight.reshape(3, config.num_heads, hd, d)[2]
    assert torch.equal(v_after, v_full[orders[0][0][:kept]])
    x, t, y = model_inputs(config, batch=2, seed=3)
    with torch.no_grad():
        after, before_out = sliced_after(x, t, y), sliced_before(x, t, y)
        assert max_diff(after, reordered(x, t, y, subnet=subnet)) < ATOL
    assert max_diff(after, before_out) > 1e-2  # the reordered subnet kept other heads and channels


# ---------------------------------------------------------------------------------------------------------------------
# A real registry config; the speed of a half-width model
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s2_state() -> dict[str, torch.Tensor]:
    """DiT-S/2 weights re-randomised by `randomize_` (input-size independent apart from pos_embed).

    Built on the meta device and materialised uninitialised: DiT's own init would be overwritten anyway."""
    with torch.device("meta"):
        model = DiT(get_config("DiT-S/2", input_size=16, in_channels=4, num_classes=1000))
    model = randomize_(model.to_empty(device="cpu"), seed=11)
    return {k: v for k, v in model.state_dict().items() if k != "pos_embed"}


def test_registry_dit_s2_half_subnet_slices_exactly(s2_state) -> None:
    config = get_config("DiT-S/2", input_size=16, in_channels=4, num_classes=1000)
    model = model_at(s2_state, config)
    subnet = Subnet.uniform(config, attn_rate=0.5, mlp_rate=0.5, token_ratio=0.5)
    assert subnet.blocks[0] == BlockChoice(3, 768, 0.5)
    small = slice_subnet(model, subnet)
    x, t, y = model_inputs(config, batch=2, seed=4)
    with torch.no_grad():
        expected = model(x, t, y, subnet=subnet)
        got = small(x, t, y)
        assert max_diff(expected, model(x, t, y)) > 1e-3
    assert max_diff(got, expected) < ATOL
    assert small.blocks[0].attn.qkv.weight.shape == (3 * 3 * 64, 384)
    assert small.blocks[0].mlp.fc1.weight.shape == (768, 384)


def test_half_width_sliced_dit_s2_has_the_subnets_flops_and_runs(s2_state) -> None:
    """A real registry config sliced to half width: FLOPs of the subnet, and a forward of the right shape.

    Its speed is measured by `dynasearch bench latency` (results/bench/latency-cpu.*), not in a timed test.
    """
    config = get_config("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    model = model_at(s2_state, config)
    subnet = Subnet.uniform(config, attn_rate=0.5, mlp_rate=0.5)
    small = slice_subnet(model, subnet)
    ratio = closed_form_flops(small.config) / closed_form_flops(config)
    assert closed_form_flops(small.config) == closed_form_flops(config, subnet)
    assert ratio < 0.6
    x, t, y = model_inputs(config, batch=2, seed=0)
    with torch.no_grad():
        out = small(x, t, y)
    assert out.shape == (2, config.out_channels, 32, 32) and torch.isfinite(out).all()
