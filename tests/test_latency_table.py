"""Latency tables: the prediction is the sum of the table's entries, JSON round trip, bad tables refused, the
measurement on tiny models, and a latency-budgeted search (DiT-N/2, 8x8x1, 10 classes)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fake_supernet_run

from dynasearch.bench import LatencyTableConfig, bench_latency_table, save_bench
from dynasearch.bench.common import BenchError
from dynasearch.bench.latency_table import (
    calibration_subnets,
    fit_scale,
    table_choices,
    time_call,
    validation_subnets,
)
from dynasearch.cli import main
from dynasearch.cost.latency_table import (
    LatencyTable,
    LatencyTableError,
    format_latency,
    parse_latency,
)
from dynasearch.errors import BudgetError, SearchError
from dynasearch.model import get_config
from dynasearch.model.rates import tokens_kept
from dynasearch.model.schedule import SubnetSchedule, TimestepBuckets
from dynasearch.model.subnet import BlockChoice, Subnet
from dynasearch.search.config import SearchConfig
from dynasearch.search.run import run_search
from dynasearch.space import load_space


def _config():
    """The fake supernet's model: DiT-N/2 at 8x8x1 (4 heads, MLP 128 in groups of 32, 16 tokens)."""
    return get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)


def synthetic_table(config=None, batch: int = 2) -> LatencyTable:
    """A table with known entries: attention h ms per h heads, MLP (w/32) * (k/16) ms, embed 0.5 ms, final 0.25 ms."""
    config = config or _config()
    heads, pairs = table_choices(config, (0.5, 0.75, 1.0))
    return LatencyTable(
        model=config, batch=batch, device="cpu", dtype="float32", embed=0.5e-3, final=0.25e-3,
        attn={h: h * 1e-3 for h in heads},
        mlp={(w, k): (w / 32) * (k / 16) * 1e-3 for w, k in pairs},
    )


# --- the table ----------------------------------------------------------------------------------------------------
def test_prediction_is_the_sum_of_the_entries() -> None:
    table = synthetic_table()
    subnet = Subnet((BlockChoice(2, 64, 0.5), BlockChoice(4, 128, 1.0)))
    # embed + block 0 (2 heads; 64 channels on 8 tokens) + block 1 (4 heads; 128 on 16) + final
    expected = 0.5e-3 + (2e-3 + 2 * 0.5 * 1e-3) + (4e-3 + 4 * 1.0 * 1e-3) + 0.25e-3
    assert table.predict(subnet) == pytest.approx(expected, rel=1e-12)
    parts = table.breakdown(subnet)
    assert list(parts) == ["embed", "blocks.0", "blocks.1", "final"]
    assert sum(parts.values()) == pytest.approx(expected, rel=1e-12)
    assert table.predict() == pytest.approx(0.5e-3 + 2 * (4e-3 + 4e-3) + 0.25e-3)


def test_token_counts_between_measured_ones_are_interpolated() -> None:
    table = synthetic_table()
    n = table.model.num_tokens
    assert tokens_kept(0.6, n) == 10  # between the measured 8 (0.5) and 12 (0.75) tokens
    full = Subnet((BlockChoice(1, 32, 1.0), BlockChoice(1, 32, 1.0)))
    cut = Subnet((BlockChoice(1, 32, 0.6), BlockChoice(1, 32, 1.0)))
    assert table.predict(full) - table.predict(cut) == pytest.approx((16 - 10) / 16 * 1e-3, rel=1e-9)
    with pytest.raises(LatencyTableError, match="near 2 tokens"):  # below the smallest measured count
        table.predict(Subnet((BlockChoice(1, 32, 0.1), BlockChoice(1, 32, 1.0))))


def test_schedule_latency_is_the_mean_over_the_steps() -> None:
    table = synthetic_table()
    big = Subnet.full(table.model)
    small = Subnet((BlockChoice(1, 32, 0.5),) * 2)
    schedule = SubnetSchedule(TimestepBuckets.equal(2), (small, big))  # t < 500: small, t >= 500: big
    steps = [999, 750, 500, 250, 0]
    expected = (3 * table.predict(big) + 2 * table.predict(small)) / 5
    assert table.predict_schedule(schedule, steps) == pytest.approx(expected, rel=1e-12)


def test_json_round_trip(tmp_path: Path) -> None:
    table = replace(synthetic_table(), machine={"cpu": "x"}, validation={"median_abs_error_pct": 3.0})
    path = table.save(tmp_path / "deep" / "t.json")
    back = LatencyTable.load(path)
    assert back == table
    subnet = Subnet((BlockChoice(3, 96, 0.75), BlockChoice(1, 32, 0.5)))
    assert back.predict(subnet) == table.predict(subnet)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("attn_s"), "missing field"),
        (lambda d: d.update(format="other"), "format must be"),
        (lambda d: d["attn_s"][0].update(seconds=-1.0), r"attn_s\[0\].seconds must be a positive"),
        (lambda d: d["attn_s"][0].update(heads=99), r"heads must be an integer in \[1, 4\]"),
        (lambda d: d["mlp_s"][0].update(mlp_hidden=33), "not a multiple of the group size 32"),
        (lambda d: d["mlp_s"].append(dict(d["mlp_s"][0])), "repeats the entry"),
        (lambda d: d.update(device="tpu"), "device must be cpu or cuda"),
        (lambda d: d["model"].update(depth="two"), "model:"),
    ],
)
def test_bad_tables_are_refused_naming_the_file(tmp_path: Path, change, message: str) -> None:
    doc = synthetic_table().to_dict()
    change(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LatencyTableError, match=message) as info:
        LatencyTable.load(path)
    assert str(path) in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(LatencyTableError, match="does not exist"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "torn.json").write_text('{"format": ')
    with pytest.raises(LatencyTableError, match=r"torn\.json"):
        LatencyTable.load(tmp_path / "torn.json")


def test_model_mismatch_names_the_field() -> None:
    table = synthetic_table()
    table.check_model(_config().replace(num_classes=1000))  # classes do not change latency
    with pytest.raises(LatencyTableError, match=r"hidden_size 32 .* supernet has hidden_size 384"):
        table.check_model(get_config("DiT-S/2", input_size=8, in_channels=1))


def test_parse_latency() -> None:
    assert parse_latency("40ms") == pytest.approx(0.04)
    assert parse_latency("0.04s") == pytest.approx(0.04)
    assert parse_latency("40") == pytest.approx(0.04)
    assert parse_latency("500us") == pytest.approx(5e-4)
    for bad in ("fast", "-3ms", "0", "40 minutes"):
        with pytest.raises(BudgetError, match="--latency"):
            parse_latency(bad)
    assert format_latency(0.0413) == "41.3 ms" and format_latency(2.1) == "2.10 s"


# --- measuring it -------------------------------------------------------------------------------------------------
def test_time_call_is_the_median() -> None:
    calls = []
    assert time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5) >= 0
    assert len(calls) == 7


def test_block_halves_are_the_block(tiny_model, inputs_for) -> None:
    """The table times a block in two halves: together they must compute exactly what the block does."""
    block = tiny_model.blocks[0]
    x = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    for choice in (BlockChoice(4, 128, 1.0), BlockChoice(2, 64, 0.5)):
        h, mods = block.attn_part(x, c, choice)
        assert torch.equal(block.mlp_part(h, mods, choice), block(x, c, choice))
    x, t, y = inputs_for(tiny_model.config)
    h, cond = tiny_model.embed(x, t, y, False)
    for b in tiny_model.blocks:
        h = b(h, cond)
    assert torch.equal(tiny_model.head(h, cond), tiny_model(x, t, y))


def test_config_checks() -> None:
    with pytest.raises(BenchError, match="--dtype must be fp32 or bf16, got 'fp16'"):
        LatencyTableConfig(dtype="fp16")
    with pytest.raises(BenchError, match="--token-ratios must be numbers in"):
        LatencyTableConfig(token_ratios=(0.5, 1.5))
    with pytest.raises(BenchError, match="--copies must be positive"):
        LatencyTableConfig(copies=0)
    with pytest.raises(BenchError, match="--device must be cpu or cuda"):
        LatencyTableConfig(device="tpu")


def test_validation_subnets_are_distinct_and_apart_from_the_calibration_ones() -> None:
    config = _config()
    calibration = calibration_subnets(config, "blockwise", 4, seed=0)
    assert [n for n, _ in calibration[:2]] == ["calib-full", "calib-smallest"]
    assert calibration[0][1] == Subnet.full(config) and calibration[1][1] == load_space("blockwise").smallest(config)
    subnets = validation_subnets(config, "blockwise", 5, seed=0, exclude={s for _, s in calibration})
    assert [n for n, _ in subnets] == [f"random-{i}" for i in range(1, 6)]
    everything = {s for _, s in calibration + subnets}
    assert len(everything) == 9  # all distinct: no validation subnet is a calibration one


def test_scale_is_fitted_on_whole_forwards() -> None:
    config = _config()
    table = synthetic_table(config)
    subnets = calibration_subnets(config, "blockwise", 3, seed=0)
    # whole forwards slower
    measured = [m * table.predict(s) for m, (_, s) in zip((1.05, 1.1, 1.2), subnets, strict=True)]
    scale = fit_scale(table, subnets, measured)
    assert scale == pytest.approx(1.1)  # the median
    scaled = replace(table, scale=scale)
    assert scaled.predict(subnets[1][1]) == pytest.approx(measured[1])
    assert sum(scaled.breakdown(subnets[0][1]).values()) == pytest.approx(scaled.predict(subnets[0][1]))
    assert LatencyTable.from_dict(scaled.to_dict()).scale == pytest.approx(1.1)
    legacy = scaled.to_dict()
    del legacy["scale"]  # a table written before the scale: the plain sum
    assert LatencyTable.from_dict(legacy).scale == 1.0
    with pytest.raises(LatencyTableError, match="scale must be a number in"):
        LatencyTable.from_dict({**scaled.to_dict(), "scale": 7.0})


def test_bench_measures_every_entry_and_validates(tmp_path: Path) -> None:
    cfg = LatencyTableConfig(model="DiT-N/2", input_size=8, in_channels=1, num_classes=10, batch=2, repeats=2,
                             warmup=1, validate=3, calibrate=2, copies=2, threads=1)
    result = bench_latency_table(cfg)
    table = result.latency_table
    config = table.model
    assert sorted(table.attn) == [1, 2, 3, 4]
    assert sorted(table.mlp) == [(w, k) for w in (32, 64, 96, 128) for k in (8, 12, 16)]  # blockwise: 0.5, 0.75, 1
    frame = result.table
    assert list(frame["name"]) == ["calib-full", "calib-smallest", "random-1", "random-2", "random-3"]
    assert list(frame["role"]) == ["calibration"] * 2 + ["validation"] * 3
    calibration = calibration_subnets(config, "blockwise", 2, 0)
    subnets = [s for _, s in calibration + validation_subnets(config, "blockwise", 3, 0, {s for _, s in calibration})]
    unscaled = replace(table, scale=1.0)
    for row, subnet in zip(frame.itertuples(), subnets, strict=True):
        assert row.predicted_ms == pytest.approx(1e3 * table.predict(subnet))
        assert row.error_pct == pytest.approx(100 * (row.predicted_ms - row.measured_ms) / row.measured_ms)
        raw = 1e3 * unscaled.predict(subnet)
        assert row.unscaled_error_pct == pytest.approx(100 * (raw - row.measured_ms) / row.measured_ms)
    assert table.scale == pytest.approx(fit_scale(unscaled, calibration, list(frame["measured_ms"][:2] / 1e3)))
    frame = frame[frame["role"] == "validation"]  # the summary is over the validation subnets only
    s = result.summary
    assert s["median_abs_error_pct"] == pytest.approx(frame["error_pct"].abs().median())
    assert s["target_met"] == (s["median_abs_error_pct"] <= 5.0)
    assert table.validation["median_abs_error_pct"] == s["median_abs_error_pct"]
    assert table.machine["threads"] == 1
    files = save_bench(result, tmp_path)
    assert {p.name for p in files} == {"latency-table-cpu.csv", "latency-table-cpu_entries.csv",
                                       "latency-table-cpu.png", "latency-table-cpu.json"}
    entries = pd.read_csv(tmp_path / "latency-table-cpu_entries.csv")
    assert len(entries) == 2 + 4 + 12 and list(entries["part"][[0, 17]]) == ["embed", "final"]


def test_cli_writes_the_table(capsys, tmp_path: Path) -> None:
    code = main(["bench", "latency-table", "--model", "DiT-N/2", "--input-size", "8", "--in-channels", "1",
                 "--num-classes", "10", "--batch", "1", "--repeats", "1", "--warmup", "0", "--validate", "1",
                 "--copies", "1", "--token-ratios", "0.5,1", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    table = LatencyTable.load(tmp_path / "latency-table-cpu.table.json")
    assert table.batch == 1 and sorted({k for _, k in table.mlp}) == [8, 16]
    assert table.settings["token_ratios"] == [0.5, 1.0]
    sidecar = json.loads((tmp_path / "latency-table-cpu.json").read_text())
    assert "dynasearch bench latency-table --model DiT-N/2" in sidecar["command"]
    assert sidecar["summary"]["validated_subnets"] == 1 and sidecar["summary"]["calibration_subnets"] == 4
    assert "prediction error over 1 validation subnets" in out


def test_registry_table_dit_s2() -> None:
    """A registry model's table: DiT-S/2 at 32x32x4 (256 tokens), one repeat, no validation (about 3 s)."""
    cfg = LatencyTableConfig(model="DiT-S/2", batch=1, repeats=1, warmup=0, validate=0, calibrate=0, copies=1,
                             threads=1)
    table = bench_latency_table(cfg).latency_table
    assert len(table.attn) == 6 and len(table.mlp) == 6 * 3
    assert {k for _, k in table.mlp} == {128, 192, 256}
    assert math.isfinite(table.predict())
    assert table.predict() > table.predict(load_space("blockwise").smallest(table.model))


# --- a latency-budgeted search ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_supernet_run(tmp_path_factory.mktemp("run") / "supernet")


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_table().save(tmp_path_factory.mktemp("table") / "table.json")


def _search(run_dir: Path, out: Path, **kw) -> SearchConfig:
    base = {"supernet": run_dir, "flops": None, "out": out, "trials": 10, "proxy_samples": 32, "export_top": 2,
            "seed": 0}
    base.update(kw)
    return SearchConfig(**base)


def test_latency_budgeted_search_keeps_feasible_trials_under_the_budget(run_dir: Path, table_path: Path,
                                                                         tmp_path: Path) -> None:
    table = LatencyTable.load(table_path)
    budget_ms = 12.0  # full model 16.75 ms, smallest 0.5 + 2 * (1 + 0.5) + 0.25 = 3.75 ms
    out = tmp_path / "s"
    result = run_search(_search(run_dir, out, latency=f"{budget_ms}ms", latency_table=table_path), progress=False)
    trials = pd.read_csv(out / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    for row in done.itertuples():
        assert row.latency_ms == pytest.approx(1e3 * table.predict(Subnet.from_dict(json.loads(row.subnet))))
        assert row.feasible == (row.latency_ms <= budget_ms)  # no FLOPs budget: latency alone decides
    assert done["feasible"].any() and not done["feasible"].all()
    pareto = pd.read_csv(out / "pareto.csv")
    assert (pareto["latency_ms"] <= budget_ms).all()
    best = json.loads((out / "best.json").read_text())
    assert best["latency_budget_ms"] == pytest.approx(budget_ms)
    assert best["predicted_latency_ms"] <= budget_ms
    assert best["full_model"] is False
    assert best["settings"]["latency_budget_s"] == pytest.approx(budget_ms / 1e3)
    latency = pd.read_csv(out / "latency.csv")
    assert latency["name"].iloc[0] == "best" and (latency["measured_ms"] > 0).all()
    assert (latency["predicted_ms"] <= budget_ms).all()
    meta = json.loads((out / "subnets" / "best" / "config.json").read_text())
    assert json.dumps(meta).count("predicted_latency_ms") == 1
    assert result.exported[0]["measured_latency_ms"] == pytest.approx(latency["measured_ms"].iloc[0])


def test_latency_and_flops_together(run_dir: Path, table_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "both"
    run_search(_search(run_dir, out, flops="0.6x", latency="12ms", latency_table=table_path, trials=8,
                       export_top=0), progress=False)
    trials = pd.read_csv(out / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert (done["feasible"] == (done["flops_feasible"] & (done["latency_ms"] <= 12.0))).all()


def test_latency_option_errors(run_dir: Path, table_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="--latency needs --latency-table"):
        _search(run_dir, tmp_path / "a", latency="40ms")
    with pytest.raises(SearchError, match="--latency-table needs --latency"):
        _search(run_dir, tmp_path / "a", flops="0.5x", latency_table=table_path)
    with pytest.raises(SearchError, match="give a budget"):
        _search(run_dir, tmp_path / "a")
    with pytest.raises(BudgetError, match="--latency 'soon'"):
        _search(run_dir, tmp_path / "a", latency="soon", latency_table=table_path)
    with pytest.raises(BudgetError, match="below the predicted latency of the smallest subnet"):
        run_search(_search(run_dir, tmp_path / "b", latency="1ms", latency_table=table_path), progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(SearchError, match="does not exist"):
        run_search(_search(run_dir, tmp_path / "c", latency="9ms", latency_table=tmp_path / "none.json"),
                   progress=False)
    other = replace(synthetic_table(), model=_config().replace(qk_norm=True))
    with pytest.raises(SearchError, match="qk_norm True"):
        run_search(_search(run_dir, tmp_path / "d", latency="9ms", latency_table=other.save(tmp_path / "o.json")),
                   progress=False)


def test_cli_search_with_a_latency_budget(capsys, run_dir: Path, table_path: Path, tmp_path: Path) -> None:
    code = main(["search", "--supernet", str(run_dir), "--latency", "12", "--latency-table", str(table_path),
                 "--trials", "4", "--proxy-samples", "16", "--export-top", "0", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0
    assert "ms predicted" in out and "budget 12.00 ms" in out
    code = main(["search", "--supernet", str(run_dir), "--latency", "12", "--out", str(tmp_path / "t")])
    assert code == 2
    assert "--latency needs --latency-table" in capsys.readouterr().err


def test_timestep_search_with_a_latency_budget(run_dir: Path, table_path: Path, tmp_path: Path) -> None:
    """A timestep space under a budget on the mean predicted latency per sampler step (no FLOPs budget)."""
    from dynasearch.diffusion.factory import diffusion_for
    from dynasearch.search.config import TimestepSettings

    table = LatencyTable.load(table_path)
    budget_ms = 10.0  # full model 16.75 ms, smallest 3.75 ms
    out = tmp_path / "ts"
    result = run_search(_search(run_dir, out, latency=f"{budget_ms}ms", latency_table=table_path, space="timestep",
                                trials=6, proxy_samples=64, timestep=TimestepSettings(sample_steps=10)), progress=False)
    schedules = pd.read_csv(out / "schedules.csv")
    steps = diffusion_for(table.model).timestep_schedule(10)  # the sampler's 10 steps
    for row in schedules.itertuples():
        schedule = SubnetSchedule.from_dict(json.loads(row.schedule))
        assert row.mean_latency_ms == pytest.approx(1e3 * table.predict_schedule(schedule, steps), rel=1e-9)
        assert row.within_budget == (row.mean_latency_ms <= budget_ms)
        assert row.measured_latency_ms > 0
    assert list(schedules["method"]) == ["knapsack", "joint", "static uniform"]
    winner = schedules[schedules["winner"]].iloc[0]
    assert winner["within_budget"] and winner["mean_latency_ms"] <= budget_ms
    bucket_trials = pd.read_csv(out / "bucket_trials.csv")
    assert "latency_s" in bucket_trials
    joint = pd.read_csv(out / "joint_trials.csv")
    assert (joint["feasible"] == (joint["mean_latency_ms"] <= budget_ms)).all() and joint["feasible"].any()
    latency = pd.read_csv(out / "latency.csv")
    assert list(latency["name"]) == [m.replace(" ", "-") for m in schedules["method"]]
    assert result.best["latency_budget_ms"] == pytest.approx(budget_ms)


def test_report_plots_the_front_against_latency(run_dir: Path, table_path: Path, tmp_path: Path) -> None:
    from dynasearch.report import ReportConfig, build_report
    from dynasearch.report.data import latency_plot_data, read_search

    out = tmp_path / "s"
    run_search(_search(run_dir, out, latency="12ms", latency_table=table_path, trials=8, export_top=1), progress=False)
    t = read_search(out)
    d = latency_plot_data(t)
    assert d.unit == "ms" and d.budget_gflops == pytest.approx(12.0)
    x, loss, feasible = d.trials
    assert (x[feasible] <= 12.0).all() and (x[~feasible] > 12.0).all()
    fx, fy = d.front  # the feasible front over latency: x ascending, loss strictly descending
    assert (np.diff(fx) >= 0).all() and (np.diff(fy) < 0).all() and fy[-1] == pytest.approx(loss[feasible].min())
    assert d.measured is not None and len(d.measured[0]) == len(t.best["exported_latency"])
    result = build_report(ReportConfig(out, samples=False, eval_num=0, latency_repeats=1))
    names = {p.name for p in result.files}
    assert {"pareto.png", "pareto_latency.png"} <= names
    html = (out / "report.html").read_text()
    assert "pareto_latency" in html and "Latency of the exported subnets" in html
