"""Tests for dynasearch.space: loading, validation, groups, subnets, sampling, size and serialisation."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from dynasearch.errors import SearchSpaceError
from dynasearch.model.config import DiTConfig, get_config
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.space.search_space import (
    DEFAULT_SPACE,
    SearchSpace,
    load_space,
    shipped_spaces,
)

SHIPPED = ("uniform", "stagewise", "blockwise", "timestep")
RATES = (0.25, 0.5, 0.75, 1.0)
TOKENS = (0.5, 0.75, 1.0)
REPO_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
GOOD = "granularity: block\nattn_rate: [0.5, 1.0]\nmlp_rate: [0.5, 1.0]\ntoken_ratio: [1.0]\n"


@pytest.fixture(scope="module")
def tiny() -> DiTConfig:
    """DiT-N/2: 2 blocks, 4 heads, hidden 32, MLP 128 in 4 groups of 32, 16 tokens."""
    return get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)


def make(granularity: str = "block", **kw: object) -> SearchSpace:
    """A space from keyword overrides of the default choices."""
    data = {"granularity": granularity, "attn_rate": list(RATES), "mlp_rate": list(RATES), "token_ratio": list(TOKENS)}
    data.update(kw)
    return SearchSpace.from_dict(data, source="x.yaml")


# --- shipped spaces -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,granularity,stages", [("uniform", "global", None), ("stagewise", "stage", 4),
                                                     ("blockwise", "block", None)])
def test_shipped_spaces_load_by_name_and_path(name: str, granularity: str, stages: int | None) -> None:
    space = load_space(name)
    assert (space.name, space.granularity, space.stages, space.stage_sizes) == (name, granularity, stages, None)
    assert space.attn_rate == RATES and space.mlp_rate == RATES and space.token_ratio == TOKENS
    assert load_space(REPO_SPACES / f"{name}.yaml") == space
    assert load_space(str(REPO_SPACES / f"{name}.yaml")).source.endswith(f"{name}.yaml")


def test_shipped_files_are_package_data_and_documented() -> None:
    assert shipped_spaces() == sorted(SHIPPED) and DEFAULT_SPACE == "blockwise"
    package_dir = Path(__file__).resolve().parent.parent / "dynasearch" / "search_spaces"
    for name in SHIPPED:
        text = (package_dir / f"{name}.yaml").read_text()
        assert (REPO_SPACES / f"{name}.yaml").read_text() == text
        comments = "\n".join(line for line in text.splitlines() if "#" in line)
        for key in ("name", "granularity", "stages", "stage_sizes", "attn_rate", "mlp_rate", "token_ratio"):
            assert key in comments, (name, key)


def test_name_defaults_to_file_stem_and_choices_are_sorted(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("granularity: global\nattn_rate: [1, 0.5]\nmlp_rate: [1.0]\ntoken_ratio: [1.0]\n")
    space = load_space(path)
    assert space.name == "mine" and space.attn_rate == (0.5, 1.0) and isinstance(space.attn_rate[1], float)
    assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert make().describe() == (
        "x (block): attn_rate 0.25/0.5/0.75/1.0, mlp_rate 0.25/0.5/0.75/1.0, token_ratio 0.5/0.75/1.0"
    )


# --- groups ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "depth,kw,sizes",
    [
        (12, {"granularity": "stage", "stages": 4}, [3, 3, 3, 3]),
        (10, {"granularity": "stage", "stages": 4}, [3, 3, 2, 2]),
        (28, {"granularity": "stage", "stages": 4}, [7, 7, 7, 7]),
        (5, {"granularity": "stage", "stages": 5}, [1, 1, 1, 1, 1]),
        (12, {"granularity": "stage", "stage_sizes": [2, 4, 6]}, [2, 4, 6]),
        (10, {"granularity": "global"}, [10]),
        (3, {"granularity": "block"}, [1, 1, 1]),
    ],
)
def test_groups(tiny: DiTConfig, depth: int, kw: dict, sizes: list[int]) -> None:
    groups = make(**kw).groups(tiny.replace(depth=depth))
    assert [len(g) for g in groups] == sizes
    assert [b for g in groups for b in g] == list(range(depth))


def test_groups_reject_stages_that_do_not_fit(tiny: DiTConfig) -> None:
    expected = r"^search space 'stagewise': stages is 4 but model 'DiT-N/2' has only 2 blocks"
    with pytest.raises(SearchSpaceError, match=expected):
        load_space("stagewise").groups(tiny)
    with pytest.raises(SearchSpaceError, match=r"'x.yaml'.*stage_sizes \[1, 2\] sum to 3 but model 'DiT-N/2' has 2"):
        make("stage", stage_sizes=[1, 2]).largest(tiny)


def test_validate_for_requires_token_selection(tiny: DiTConfig) -> None:
    plain = tiny.replace(token_selection=False)
    with pytest.raises(SearchSpaceError, match=r"token_ratio 0.5, 0.75 needs token selection.*'DiT-N/2'"):
        load_space("blockwise").validate_for(plain)
    make(token_ratio=[1.0]).validate_for(plain)
    assert make(token_ratio=[1.0]).largest(plain) == Subnet.full(plain)


# --- subnets --------------------------------------------------------------------------------------------------------
def test_largest_smallest_tiny(tiny: DiTConfig) -> None:
    for name in SHIPPED[::2]:
        space = load_space(name)
        assert space.largest(tiny) == Subnet.full(tiny)
        assert space.smallest(tiny) == Subnet((BlockChoice(1, 32, 0.5),) * 2)


@pytest.mark.parametrize(
    "model,depth,heads,small,decisions,size",
    [
        ("DiT-S/2", 12, 6, BlockChoice(2, 512, 0.5), {"uniform": 3, "stagewise": 12, "blockwise": 36, "timestep": 36},
         {"uniform": 48, "stagewise": 48**4, "blockwise": 48**12, "timestep": 48**12}),  # timestep: per bucket
        ("DiT-XL/2", 28, 16, BlockChoice(4, 1152, 0.5),
         {"uniform": 3, "stagewise": 12, "blockwise": 84, "timestep": 84},
         {"uniform": 48, "stagewise": 48**4, "blockwise": 48**28, "timestep": 48**28}),
    ],
)
def test_real_configs(model: str, depth: int, heads: int, small: BlockChoice, decisions: dict, size: dict) -> None:
    config = get_config(model)
    assert (config.depth, config.num_heads) == (depth, heads)
    for name in SHIPPED:
        space = load_space(name)
        assert space.largest(config) == Subnet.full(config)
        assert space.smallest(config) == Subnet((small,) * depth)
        assert space.num_decisions(config) == decisions[name]
        assert space.size(config) == size[name]
    assert [len(g) for g in load_space("stagewise").groups(config)] == [depth // 4] * 4


def test_subnet_expands_groups_and_checks_values(tiny: DiTConfig) -> None:
    config = tiny.replace(depth=4)
    space = make("stage", stage_sizes=[1, 3])
    sub = space.subnet(config, [0.25, 1.0], [0.5, 0.75], [1.0, 0.5000000001])
    assert [b.heads for b in sub.blocks] == [1, 4, 4, 4]
    assert [b.mlp_hidden for b in sub.blocks] == [64, 96, 96, 96]
    assert sub.token_ratios == [1.0, 0.5, 0.5, 0.5]
    assert space.uniform(config, 0.5, 0.5, 0.75) == Subnet.uniform(config, 0.5, 0.5, 0.75)
    with pytest.raises(SearchSpaceError, match=r"'x.yaml'.*attn_rate 0.3 \(group 1\) is not one of the choices"):
        space.subnet(config, [0.25, 0.3], [0.5, 0.5], [1.0, 1.0])
    with pytest.raises(SearchSpaceError, match=r"mlp_rate has 3 entries but the space has 2 decision groups"):
        space.subnet(config, [1.0, 1.0], [1.0] * 3, [1.0, 1.0])


def test_sample_is_deterministic_and_covers_choices(tiny: DiTConfig) -> None:
    space = load_space("blockwise")
    assert space.sample(tiny, random.Random(7)) == space.sample(tiny, random.Random(7))
    draws = [space.sample(tiny, random.Random(seed)) for seed in range(300)]
    assert len(set(draws)) > 100
    for block in range(tiny.depth):
        assert {d.blocks[block].heads for d in draws} == {1, 2, 3, 4}
        assert {d.blocks[block].mlp_hidden for d in draws} == {32, 64, 96, 128}
        assert {d.blocks[block].token_ratio for d in draws} == set(TOKENS)
    assert all(space.contains(tiny, d) for d in draws)
    global_draws = [load_space("uniform").sample(tiny, random.Random(s)) for s in range(20)]
    assert all(d.blocks[0] == d.blocks[1] for d in global_draws)
    config = get_config("DiT-S/2")
    staged = load_space("stagewise").sample(config, random.Random(3))
    assert all(len({staged.blocks[b] for b in g}) == 1 for g in load_space("stagewise").groups(config))


@pytest.mark.parametrize("kw", [{}, {"granularity": "global"}, {"attn_rate": [0.25, 0.3, 0.5]},
                                {"mlp_rate": [0.2, 0.25, 0.9, 1.0], "token_ratio": [0.5]}])
def test_size_counts_distinct_subnets(tiny: DiTConfig, kw: dict) -> None:
    space = make(**kw)
    groups = len(space.groups(tiny))
    dims = (space.attn_rate, space.mlp_rate, space.token_ratio)
    subnets = {space.subnet(tiny, *(c[i * groups:(i + 1) * groups] for i in range(3)))
               for c in itertools.product(*(d for d in dims for _ in range(groups)))}
    assert space.size(tiny) == len(subnets)
    assert all(space.contains(tiny, s) for s in subnets)


def test_size_formula_and_collapsing_rates(tiny: DiTConfig) -> None:
    assert load_space("blockwise").size(tiny) == (4 * 4 * 3) ** 2
    assert make(attn_rate=[0.25, 0.3, 0.5]).size(tiny) == (2 * 4 * 3) ** 2  # 0.25 and 0.3 both keep 1 of 4 heads
    assert load_space("blockwise").num_decisions(tiny) == 6


def test_contains(tiny: DiTConfig) -> None:
    mixed = Subnet((BlockChoice(4, 128, 1.0), BlockChoice(1, 32, 0.5)))
    assert load_space("blockwise").contains(tiny, mixed)
    assert not load_space("uniform").contains(tiny, mixed)
    assert not make(token_ratio=[1.0]).contains(tiny, mixed)
    assert not load_space("blockwise").contains(tiny, Subnet(mixed.blocks[:1]))
    assert not load_space("blockwise").contains(get_config("DiT-S/2"), Subnet.uniform(get_config("DiT-S/2"), 4 / 6))


def test_check_trained_on() -> None:
    blockwise = load_space("blockwise")
    for name in SHIPPED:
        load_space(name).check_trained_on(blockwise)
    make(attn_rate=[0.5, 1.0], token_ratio=[1.0]).check_trained_on(blockwise)
    with pytest.raises(SearchSpaceError) as info:
        make(attn_rate=[0.3, 0.5]).check_trained_on(blockwise)
    assert str(info.value) == (
        "search space 'x.yaml': attn_rate 0.3 was not in the supernet's training space 'blockwise' "
        "(0.25, 0.5, 0.75, 1.0)"
    )
    with pytest.raises(SearchSpaceError, match=r"token_ratio 0.25, 0.4 were not in .*'blockwise' \(0.5, 0.75, 1.0\)"):
        make(token_ratio=[0.25, 0.4, 1.0]).check_trained_on(blockwise)


# --- bad files ------------------------------------------------------------------------------------------------------
BAD = [
    ("unknown.yaml", GOOD + "width_buckets: 4\n", ["width_buckets", "allowed keys: name, granularity"]),
    ("missing.yaml", "granularity: block\nattn_rate: [1.0]\ntoken_ratio: [1.0]\n", ["missing", "mlp_rate"]),
    ("scalar.yaml", GOOD.replace("attn_rate: [0.5, 1.0]", "attn_rate: 0.5"), ["attn_rate must be a list", "0.5"]),
    ("empty_list.yaml", GOOD.replace("[0.5, 1.0]", "[]", 1), ["attn_rate is an empty list"]),
    ("string.yaml", GOOD.replace("[0.5, 1.0]", "[0.5, abc]", 1), ["attn_rate has value 'abc' which is not a number"]),
    ("bool.yaml", GOOD.replace("token_ratio: [1.0]", "token_ratio: [true]"), ["token_ratio has value True"]),
    ("high.yaml", GOOD.replace("[0.5, 1.0]", "[0.5, 1.5]", 1), ["attn_rate has value 1.5 outside (0, 1]"]),
    ("zero.yaml", GOOD.replace("mlp_rate: [0.5, 1.0]", "mlp_rate: [0, 1.0]"), ["mlp_rate has value 0 outside"]),
    ("neg.yaml", GOOD.replace("token_ratio: [1.0]", "token_ratio: [-0.5]"), ["token_ratio has value -0.5 outside"]),
    ("nan.yaml", GOOD.replace("[0.5, 1.0]", "[.nan]", 1), ["attn_rate has value nan outside"]),
    ("dup.yaml", GOOD.replace("[0.5, 1.0]", "[0.5, 1.0, 0.50]", 1), ["attn_rate has duplicate value 0.5"]),
    ("gran.yaml", GOOD.replace("block", "layer"), ["granularity has value 'layer'", "global, stage, block"]),
    ("nostages.yaml", GOOD.replace("block", "stage"), ["granularity 'stage' needs exactly one of stages"]),
    ("both.yaml", GOOD.replace("block", "stage") + "stages: 2\nstage_sizes: [1, 1]\n", ["exactly one of stages"]),
    ("stages0.yaml", GOOD.replace("block", "stage") + "stages: 0\n", ["stages has value 0"]),
    ("stagesbool.yaml", GOOD.replace("block", "stage") + "stages: yes\n", ["stages has value True"]),
    ("stagesf.yaml", GOOD.replace("block", "stage") + "stages: 2.5\n", ["stages has value 2.5"]),
    ("sizes.yaml", GOOD.replace("block", "stage") + "stage_sizes: [3, 0]\n", ["stage_sizes has value 0"]),
    ("sizes_str.yaml", GOOD.replace("block", "stage") + "stage_sizes: abc\n", ["stage_sizes must be a non-empty"]),
    ("blockstages.yaml", GOOD + "stages: 4\n", ["stages is only allowed with granularity 'stage', not 'block'"]),
    ("name.yaml", GOOD + "name: ''\n", ["name must be a non-empty string"]),
    ("list.yaml", "- 1\n- 2\n", ["expected a mapping", "found a list"]),
    ("empty.yaml", "# nothing here\n", ["expected a mapping", "found an empty document"]),
    ("broken.yaml", "granularity: block\nattn_rate: [0.5]\nmlp_rate: : x\n", ["not valid YAML at line 3"]),
    ("unclosed.yaml", "granularity: block\nattn_rate: [0.5, 1.0\nmlp_rate: [1.0]\n", ["not valid YAML", "line 2"]),
]


@pytest.mark.parametrize("filename,text,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_files(tmp_path: Path, filename: str, text: str, expected: list[str]) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(SearchSpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"search space '{path}'")
    for part in expected:
        assert part in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SearchSpaceError, match=r"'nope.yaml' does not exist \(shipped spaces: blockwise, stagewise"):
        load_space("nope.yaml")
    with pytest.raises(SearchSpaceError, match="is not a file"):
        load_space(tmp_path)


def test_from_dict_errors_name_the_space() -> None:
    with pytest.raises(SearchSpaceError, match=r"^search space 'mine': attn_rate has value 2 outside"):
        SearchSpace.from_dict({"name": "mine", "granularity": "block", "attn_rate": [2], "mlp_rate": [1],
                               "token_ratio": [1]})
    with pytest.raises(SearchSpaceError, match=r"^search space '<dict>': expected a mapping"):
        SearchSpace.from_dict([1, 2])
