"""Tests for dynasearch.model.subnet and .rates: Subnet / BlockChoice identity, JSON round trips, rate conversion,
validation, and the config a subnet slices into."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dynasearch.errors import DynasearchError, SubnetError
from dynasearch.model import DiT, DiTConfig, get_config
from dynasearch.model.rates import rate_to_heads, rate_to_mlp_hidden
from dynasearch.model.subnet import BlockChoice, Subnet


@pytest.fixture
def xl() -> DiTConfig:
    return get_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)


@pytest.fixture
def sliced() -> DiTConfig:
    """A physically sliced DiT-N/2: 4 heads of 8 channels, MLP 128 in groups of 32."""
    base = get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    return base.replace(block_heads=(2, 4), block_mlp_hidden=(64, 128), block_token_ratios=(0.5, 1.0))


def _mixed(tiny_config: DiTConfig) -> Subnet:
    return Subnet((BlockChoice(3, 96, 0.5), BlockChoice(1, 32, 1.0)))


# --- identity --------------------------------------------------------------------------------------------------------
def test_subnet_is_frozen_and_hashable(tiny_config) -> None:
    a = Subnet.uniform(tiny_config, attn_rate=0.5, mlp_rate=0.75, token_ratio=0.5)
    b = Subnet((BlockChoice(2, 96, 0.5), BlockChoice(2, 96, 0.5)))
    c = Subnet.full(tiny_config)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != c
    table = {a: "half", c: "full"}
    assert table[b] == "half" and table[Subnet.full(tiny_config)] == "full"
    assert len({a, b, c, Subnet.uniform(tiny_config)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.blocks = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.blocks[0].heads = 4  # type: ignore[misc]
    assert isinstance(a.blocks, tuple)


def test_int_and_float_token_ratio_are_the_same_subnet() -> None:
    a = Subnet((BlockChoice(2, 64, 1),))
    b = Subnet((BlockChoice(2, 64, 1.0),))
    assert a == b and hash(a) == hash(b)


def test_queries(tiny_config) -> None:
    s = _mixed(tiny_config)
    assert s.depth == 2
    assert s.attn_rates(tiny_config) == [0.75, 0.25]
    assert s.mlp_rates(tiny_config) == [0.75, 0.25]
    assert s.token_ratios == [0.5, 1.0]
    assert s.describe(tiny_config) == "attn 0.50 / mlp 0.50 / tokens 0.75"


# --- JSON -------------------------------------------------------------------------------------------------------------
def test_json_round_trip(tiny_config) -> None:
    s = _mixed(tiny_config)
    d = s.to_dict()
    assert d == {
        "blocks": [
            {"heads": 3, "mlp_hidden": 96, "token_ratio": 0.5},
            {"heads": 1, "mlp_hidden": 32, "token_ratio": 1.0},
        ]
    }
    assert Subnet.from_dict(d) == s
    assert Subnet.from_dict(json.loads(s.to_json())) == s
    # token_ratio is optional and defaults to 1.0; ints are accepted for it
    assert Subnet.from_dict({"blocks": [{"heads": 3, "mlp_hidden": 96}]}).blocks[0] == BlockChoice(3, 96, 1.0)
    assert Subnet.from_dict({"blocks": [{"heads": 3, "mlp_hidden": 96, "token_ratio": 1}]}).blocks[0].token_ratio == 1.0


def test_save_load(tmp_path, tiny_config) -> None:
    s = _mixed(tiny_config)
    path = tmp_path / "sub" / "net.json"
    path.parent.mkdir()
    s.save(path)
    assert json.loads(path.read_text()) == s.to_dict()
    loaded = Subnet.load(path)
    assert loaded == s and hash(loaded) == hash(s)
    assert Subnet.load(str(path)) == s
    loaded.validate(tiny_config)


@pytest.mark.parametrize(
    "data,needle",
    [
        ([1, 2], '"blocks" list'),
        ({"blocks": {}}, '"blocks" list'),
        ({"blocks": [3]}, "block 0: expected an object"),
        ({"blocks": [{"heads": 1, "mlp_hidden": 32}, {"heads": 1}]}, "block 1: missing key 'mlp_hidden'"),
        ({"blocks": [{"heads": 1, "mlp_hidden": 32, "width": 3}]}, "block 0: unknown key(s) width"),
        ({"blocks": [{"heads": "2", "mlp_hidden": 32}]}, "block 0: heads must be an integer, got '2'"),
        ({"blocks": [{"heads": True, "mlp_hidden": 32}]}, "block 0: heads must be an integer, got True"),
        ({"blocks": [{"heads": 2, "mlp_hidden": 32.0}]}, "block 0: mlp_hidden must be an integer, got 32.0"),
        ({"blocks": [{"heads": 2, "mlp_hidden": 32, "token_ratio": "0.5"}]}, "token_ratio must be a number, got '0.5'"),
    ],
)
def test_from_dict_errors(data, needle) -> None:
    with pytest.raises(SubnetError) as info:
        Subnet.from_dict(data)
    assert needle in str(info.value)


def test_load_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(SubnetError) as info:
        Subnet.load(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    assert isinstance(info.value, DynasearchError)


def test_load_invalid_json(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"blocks": [\n  {"heads": 1,,}\n]}')
    with pytest.raises(SubnetError) as info:
        Subnet.load(path)
    msg = str(info.value)
    assert str(path) in msg and "not valid JSON" in msg and "line 2" in msg


def test_load_invalid_structure_names_the_file(tmp_path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"blocks": [{"heads": 1, "mlp_hidden": 32}, {"heads": "x", "mlp_hidden": 32}]}))
    with pytest.raises(SubnetError) as info:
        Subnet.load(path)
    assert str(path) in str(info.value) and "block 1" in str(info.value)


def test_load_directory_and_binary(tmp_path) -> None:
    with pytest.raises(SubnetError, match="cannot be read"):
        Subnet.load(tmp_path)
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SubnetError) as info:
        Subnet.load(path)
    assert str(path) in str(info.value)


# --- rates -> sizes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "attn,mlp,heads,hidden",
    [
        (1.0, 1.0, 16, 4608),
        (0.5, 0.5, 8, 2304),
        (0.25, 0.75, 4, 3456),
        (0.1, 0.1, 2, 576),  # 1.6 -> 2 heads / groups
        (0.03, 0.03, 1, 288),  # at least one head / one group
        (0.5625, 0.40625, 9, 2016),  # 9 heads; 6.5 groups -> 7 (half-up, not banker's 6) x 288
        (0.40625, 0.53125, 7, 2592),  # 6.5 heads -> 7 (half-up); 8.5 groups -> 9 x 288
        (0.15625, 0.15625, 3, 864),  # 2.5 -> 3 (banker's rounding would give 2)
    ],
)
def test_uniform_on_xl(xl, attn, mlp, heads, hidden) -> None:
    assert xl.mlp_group_size == 288 and xl.mlp_groups == 16
    s = Subnet.uniform(xl, attn_rate=attn, mlp_rate=mlp, token_ratio=0.75)
    assert s.depth == 28
    assert all(b == BlockChoice(heads, hidden, 0.75) for b in s.blocks)
    assert rate_to_heads(xl, attn) == heads
    assert rate_to_mlp_hidden(xl, mlp) == hidden


def test_uniform_defaults_are_full(xl) -> None:
    assert Subnet.uniform(xl) == Subnet.full(xl)
    assert Subnet.full(xl).blocks[0] == BlockChoice(16, 4608, 1.0)


def test_from_rates_per_block(tiny_config) -> None:
    s = Subnet.from_rates(tiny_config, [0.25, 1.0], [0.5, 0.25], [1.0, 0.3])
    assert s.blocks == (BlockChoice(1, 64, 1.0), BlockChoice(4, 32, 0.3))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_from_rates_length_mismatch(tiny_config, which) -> None:
    lists = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    lists[which] = [1.0, 1.0, 1.0]
    name = ["attn_rates", "mlp_rates", "token_ratios"][which]
    with pytest.raises(SubnetError, match=f"{name} has 3 entries for a model of 2 blocks"):
        Subnet.from_rates(tiny_config, *lists)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, "abc", None, True])
def test_bad_rates(tiny_config, bad) -> None:
    with pytest.raises(SubnetError) as info:
        Subnet.from_rates(tiny_config, [1.0, bad], [1.0, 1.0], [1.0, 1.0])
    assert "block 1" in str(info.value) and "attn_rate" in str(info.value) and repr(bad) in str(info.value)
    with pytest.raises(SubnetError, match="mlp_rate"):
        Subnet.uniform(tiny_config, mlp_rate=bad)
    with pytest.raises(SubnetError, match="token_ratio"):
        Subnet.uniform(tiny_config, token_ratio=bad)


# --- validate ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "choice,needles",
    [
        (BlockChoice(0, 128, 1.0), ["block 1", "heads", "[1, 4]", "got 0"]),
        (BlockChoice(5, 128, 1.0), ["block 1", "heads", "got 5"]),
        (BlockChoice(2.0, 128, 1.0), ["block 1", "heads", "got 2.0"]),
        (BlockChoice("abc", 128, 1.0), ["block 1", "heads", "got 'abc'"]),
        (BlockChoice(4, 0, 1.0), ["block 1", "mlp_hidden", "[1, 128]", "got 0"]),
        (BlockChoice(4, 160, 1.0), ["block 1", "mlp_hidden", "got 160"]),
        (BlockChoice(4, 48, 1.0), ["block 1", "mlp_hidden 48", "multiple of the group size 32"]),
        (BlockChoice(4, 128, 0.0), ["block 1", "token_ratio", "got 0.0"]),
        (BlockChoice(4, 128, 1.5), ["block 1", "token_ratio", "got 1.5"]),
        (BlockChoice(4, 128, -0.1), ["block 1", "token_ratio", "got -0.1"]),
        (BlockChoice(4, 128, "abc"), ["block 1", "token_ratio", "got 'abc'"]),
        (BlockChoice(4, 128, float("nan")), ["block 1", "token_ratio", "got nan"]),
    ],
)
def test_validate_errors(tiny_config, choice, needles) -> None:
    s = Subnet((BlockChoice(4, 128, 1.0), choice))
    with pytest.raises(SubnetError) as info:
        s.validate(tiny_config)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_validate_depth_and_type(tiny_config) -> None:
    with pytest.raises(SubnetError, match="subnet has 3 blocks but model 'DiT-N/2' has 2"):
        Subnet((BlockChoice(4, 128),) * 3).validate(tiny_config)
    with pytest.raises(SubnetError, match="block 0: expected a BlockChoice"):
        Subnet(((4, 128, 1.0), BlockChoice(4, 128))).validate(tiny_config)  # type: ignore[arg-type]


def test_validate_token_ratio_needs_token_selection(tiny_config) -> None:
    no_routers = tiny_config.replace(token_selection=False)
    s = Subnet((BlockChoice(4, 128, 1.0), BlockChoice(4, 128, 0.5)))
    s.validate(tiny_config)
    with pytest.raises(SubnetError, match=r"block 1: token_ratio 0\.5 needs token selection"):
        s.validate(no_routers)
    Subnet.full(no_routers).validate(no_routers)


def test_validate_accepts_the_whole_grid(tiny_config) -> None:
    for h in range(1, 5):
        for g in range(1, 5):
            for r in (0.05, 0.5, 1.0):
                Subnet((BlockChoice(h, 32 * g, r),) * 2).validate(tiny_config)


def test_model_set_subnet_validates(tiny_model) -> None:
    with pytest.raises(SubnetError, match="block 0"):
        tiny_model.set_subnet(Subnet((BlockChoice(9, 128), BlockChoice(4, 128))))
    assert tiny_model.subnet == Subnet.full(tiny_model.config)  # unchanged after the error


# --- sliced configs ---------------------------------------------------------------------------------------------------
def test_full_of_sliced_config(sliced) -> None:
    assert sliced.is_sliced
    full = Subnet.full(sliced)
    assert full.blocks == (BlockChoice(2, 64, 0.5), BlockChoice(4, 128, 1.0))
    full.validate(sliced)
    # the supernet of it is full width again
    assert Subnet.full(sliced.supernet()).blocks == (BlockChoice(4, 128, 1.0),) * 2


def test_sliced_config_limits(sliced) -> None:
    # rates stay fractions of the full supernet, capped at the physical sizes
    assert Subnet.uniform(sliced).blocks == (BlockChoice(2, 64, 1.0), BlockChoice(4, 128, 1.0))
    assert Subnet.uniform(sliced, 0.25, 0.25).blocks == (BlockChoice(1, 32, 1.0), BlockChoice(1, 32, 1.0))
    assert rate_to_heads(sliced, 0.75, block=0) == 2 and rate_to_heads(sliced, 0.75, block=1) == 3
    assert rate_to_mlp_hidden(sliced, 0.75, block=0) == 64 and rate_to_mlp_hidden(sliced, 0.75, block=1) == 96
    with pytest.raises(SubnetError, match=r"block 0: heads must be an integer in \[1, 2\], got 3"):
        Subnet((BlockChoice(3, 64, 1.0), BlockChoice(4, 128, 1.0))).validate(sliced)
    with pytest.raises(SubnetError, match=r"block 0: mlp_hidden must be an integer in \[1, 64\], got 96"):
        Subnet((BlockChoice(2, 96, 1.0), BlockChoice(4, 128, 1.0))).validate(sliced)


def test_sliced_model_runs_its_stored_token_ratios(sliced) -> None:
    model = DiT(sliced)
    assert model.subnet == Subnet.full(sliced)
    assert [b.choice.token_ratio for b in model.blocks] == [0.5, 1.0]
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32)
    assert model.blocks[0].mlp.fc1.weight.shape == (64, 32)


def test_config_sliced_holds_the_subnet_sizes(sliced) -> None:
    """DiTConfig.sliced(subnet): the subnet validated, its heads, MLP widths and token ratios as physical sizes."""
    base = sliced.supernet()
    subnet = Subnet((BlockChoice(3, 64, 0.5), BlockChoice(1, 32, 1)))
    small = base.sliced(subnet)
    assert small.block_heads == (3, 1) and small.block_mlp_hidden == (64, 32)
    assert small.block_token_ratios == (0.5, 1.0) and isinstance(small.block_token_ratios[1], float)
    assert Subnet.full(small) == Subnet((BlockChoice(3, 64, 0.5), BlockChoice(1, 32, 1.0)))
    with pytest.raises(SubnetError, match="block 1"):
        sliced.sliced(Subnet((BlockChoice(2, 64, 1.0), BlockChoice(4, 160, 1.0))))
