"""Timestep buckets, subnet schedules, their FLOPs and files, and timestep buckets in search spaces."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dynasearch.cost.flops import closed_form_flops, mean_flops, step_flops
from dynasearch.diffusion.gaussian import GaussianDiffusion
from dynasearch.errors import SearchSpaceError, SubnetError
from dynasearch.model.config import get_config
from dynasearch.model.schedule import (
    SubnetSchedule,
    TimestepBuckets,
    load_subnet_or_schedule,
)
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.space.search_space import SearchSpace, load_space


# ---------------------------------------------------------------------------------------------------- buckets
def test_equal_buckets_split_the_timesteps_and_give_extras_to_early_buckets() -> None:
    assert TimestepBuckets.equal(4, 1000).boundaries == (0, 250, 500, 750, 1000)
    assert TimestepBuckets.equal(3, 1000).boundaries == (0, 334, 667, 1000)
    assert TimestepBuckets.equal(1, 10).boundaries == (0, 10)


@pytest.mark.parametrize("spec", [4, [250, 500, 750], [0, 250, 500, 750, 1000], [100, 900]])
def test_bucket_of_agrees_with_the_ranges_for_every_timestep(spec: object) -> None:
    buckets = TimestepBuckets.from_spec(spec, 1000)  # type: ignore[arg-type]
    t = torch.arange(1000)
    index = buckets.bucket_index(t)
    for k in range(len(buckets)):
        lo, hi = buckets.boundaries[k], buckets.boundaries[k + 1]
        assert all(buckets.bucket_of(v) == k for v in (lo, hi - 1))
        assert torch.equal(index == k, (t >= lo) & (t < hi))
    assert [buckets.bucket_of(int(v)) for v in t] == index.tolist()


@pytest.mark.parametrize("spec, message", [
    (0, "timestep_buckets must be an integer in [1, 1000]"),
    ([500, 250], "must start at 0 and increase strictly"),
    ([1500], "is not an integer in (0, 1000)"),
    ([10.5], "is not an integer in (0, 1000)"),
])
def test_bad_bucket_specs_are_refused_with_the_value(spec: object, message: str) -> None:
    with pytest.raises(SubnetError, match=re.escape(message)):
        TimestepBuckets.from_spec(spec, 1000)  # type: ignore[arg-type]


def test_timestep_outside_the_range_is_an_error() -> None:
    with pytest.raises(SubnetError, match="timestep 1000 is outside"):
        TimestepBuckets.equal(4).bucket_of(1000)


def test_ddim_steps_per_bucket() -> None:
    timesteps = GaussianDiffusion().timestep_schedule(50)
    counts = TimestepBuckets.equal(4).step_counts(timesteps)
    assert sum(counts) == 50
    assert counts == [sum(1 for t in timesteps if 250 * k <= t < 250 * (k + 1)) for k in range(4)]
    assert counts == [13, 12, 12, 13]


# ---------------------------------------------------------------------------------------------------- schedules
def _schedule(config_name: str = "DiT-XL/2") -> tuple[SubnetSchedule, object]:
    config = get_config(config_name)
    subnets = (
        Subnet.uniform(config, 1.0, 1.0, 1.0),
        Subnet.uniform(config, 0.75, 0.75, 1.0),
        Subnet.uniform(config, 0.5, 0.5, 0.75),
        Subnet.uniform(config, 0.25, 0.25, 0.5),
    )
    return SubnetSchedule(TimestepBuckets.equal(4), subnets), config


def test_mean_flops_weights_each_bucket_by_its_sampler_steps_on_dit_xl() -> None:
    schedule, config = _schedule()
    timesteps = GaussianDiffusion().timestep_schedule(50)
    per_bucket = [closed_form_flops(config, s) for s in schedule.subnets]  # type: ignore[arg-type]
    counts = schedule.buckets.step_counts(timesteps)
    assert mean_flops(schedule, config, timesteps) == pytest.approx(  # type: ignore[arg-type]
        sum(c * f for c, f in zip(counts, per_bucket, strict=True)) / 50
    )
    assert step_flops(schedule, config, timesteps)[0] == per_bucket[3]  # type: ignore[arg-type]  # t = 999 first
    assert step_flops(schedule, config, timesteps)[-1] == per_bucket[0]  # type: ignore[arg-type]
    assert per_bucket[0] == 118_688_661_504
    static = SubnetSchedule.static(schedule.subnets[2], schedule.buckets)
    assert static.is_static and not schedule.is_static
    assert mean_flops(static, config, timesteps) == closed_form_flops(config, schedule.subnets[2])  # type: ignore[arg-type]


def test_union_holds_every_bucket_subnet() -> None:
    a = Subnet((BlockChoice(2, 64, 1.0), BlockChoice(6, 32, 0.5)))
    b = Subnet((BlockChoice(4, 32, 0.5), BlockChoice(3, 128, 0.75)))
    union = SubnetSchedule(TimestepBuckets((0, 500, 1000)), (a, b)).union()
    assert union == Subnet((BlockChoice(4, 64, 1.0), BlockChoice(6, 128, 0.75)))


def test_schedule_mismatches_are_refused() -> None:
    schedule, _config = _schedule()
    with pytest.raises(SubnetError, match="3 subnets for 4 timestep buckets"):
        SubnetSchedule(schedule.buckets, schedule.subnets[:3])
    small = get_config("DiT-S/2")
    with pytest.raises(SubnetError,
                       match=r"schedule bucket 0 \(t 0-249\): subnet has 28 blocks but model 'DiT-S/2' has 12"):
        schedule.validate(small)


def test_schedule_json_round_trip_and_loading_from_files(tmp_path) -> None:
    schedule, _config = _schedule("DiT-S/2")
    path = tmp_path / "schedule.json"
    schedule.save(path)
    assert SubnetSchedule.from_dict(json.loads(path.read_text())) == schedule
    assert load_subnet_or_schedule(path) == schedule
    best = tmp_path / "best.json"  # a search's best.json carries the schedule (or the subnet) under a key
    best.write_text(json.dumps({"method": "knapsack", "schedule": schedule.to_dict()}))
    assert load_subnet_or_schedule(best) == schedule
    static = tmp_path / "static.json"
    static.write_text(json.dumps({"trial": 3, "subnet": schedule.subnets[1].to_dict()}))
    assert load_subnet_or_schedule(static) == schedule.subnets[1]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"timestep_boundaries": [0, 500, 1000], "buckets": [{"blocks": []}]}))
    with pytest.raises(SubnetError, match=f"subnet file '{broken}': schedule has 1 subnets for 2 timestep buckets"):
        load_subnet_or_schedule(broken)
    with pytest.raises(SubnetError, match="does not exist"):
        load_subnet_or_schedule(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------------- search space
def test_timestep_space_round_trip_and_buckets() -> None:
    space = load_space("timestep")
    assert space.timestep_aware and space.timestep_buckets == 4
    assert space.buckets(1000).boundaries == (0, 250, 500, 750, 1000)
    assert SearchSpace.from_dict(space.to_dict()) == space
    explicit = SearchSpace.from_dict({**space.to_dict(), "timestep_buckets": [100, 900]})
    assert explicit.buckets(1000).boundaries == (0, 100, 900, 1000)
    assert not load_space("blockwise").timestep_aware
    assert len(load_space("blockwise").buckets(1000)) == 1


@pytest.mark.parametrize("value, message", [
    (0, "timestep_buckets has value 0; it must be a positive integer"),
    ([500, 250], r"timestep_buckets boundaries \[500, 250\] must increase strictly"),
    ("abc", "timestep_buckets has value 'abc'; give a count"),
    (True, "timestep_buckets has value True; give a count"),
])
def test_bad_timestep_buckets_in_a_space(value: object, message: str) -> None:
    data = {**load_space("blockwise").to_dict(), "timestep_buckets": value}
    with pytest.raises(SearchSpaceError, match=message):
        SearchSpace.from_dict(data)


def test_bucket_boundary_beyond_the_diffusion_is_named() -> None:
    space = SearchSpace.from_dict({**load_space("blockwise").to_dict(), "timestep_buckets": [500, 2000]})
    with pytest.raises(SearchSpaceError, match="timestep bucket boundary 2000 is not an integer in"):
        space.buckets(1000)
