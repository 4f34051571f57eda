"""`dynasearch bench`: every benchmark's code path on tiny settings (DiT-N/2, 8x8x1, 10 classes) -- the files, the
columns and the relations between them, never the timings."""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fake_supernet_run

from dynasearch.bench import (
    BenchError,
    FlopsBenchConfig,
    LatencyBenchConfig,
    RankingBenchConfig,
    SearchBenchConfig,
    TrainBenchConfig,
    bench_flops,
    bench_latency,
    bench_ranking,
    bench_search,
    bench_train,
    hypervolume_curve,
    save_bench,
    spread_subnets,
    trials_to_reach,
    uniform_at_ratio,
)
from dynasearch.bench.common import bench_run
from dynasearch.cli import main
from dynasearch.cost.flops import closed_form_flops
from dynasearch.model import get_config
from dynasearch.space.search_space import load_space

TINY = {"model": "DiT-N/2", "input_size": 8, "in_channels": 1, "num_classes": 10}
MACHINE_KEYS = {"cpu", "cores", "torch", "threads", "device", "device_name"}


_fake_run = fake_supernet_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_run(tmp_path_factory.mktemp("run") / "supernet")


def _check_files(out: Path, stem: str, extra: tuple[str, ...] = ()) -> dict:
    for name in (f"{stem}.csv", f"{stem}.png", f"{stem}.json", *(f"{stem}_{e}.csv" for e in extra)):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / f"{stem}.json").read_text())
    assert set(doc["machine"]) >= MACHINE_KEYS and doc["date"] and doc["settings"]
    assert doc["command"].startswith(f"dynasearch bench {stem.split('-')[0]} ") and f"--out {out}" in doc["command"]
    return doc


# ---------------------------------------------------------------------------------------------------------------------
# common
# ---------------------------------------------------------------------------------------------------------------------
def test_bench_run_sets_and_restores_threads() -> None:
    before = torch.get_num_threads()
    with bench_run("cpu", 1) as run:
        assert torch.get_num_threads() == 1 and run.threads == 1 and run.device == torch.device("cpu")
        assert set(run.machine) >= MACHINE_KEYS and run.machine["threads"] == 1
    assert torch.get_num_threads() == before
    with bench_run(torch.device("cpu"), None) as run:
        assert run.threads == before


def test_config_checks_name_the_first_bad_option() -> None:
    with pytest.raises(BenchError, match=r"^--batch-size must be positive, got 0$"):
        TrainBenchConfig(steps=1, batch_size=0, distill=-1.0)
    with pytest.raises(BenchError, match=r"^--sandwich must be 0 or more, got -1$"):
        TrainBenchConfig(warmup=0, sandwich=-1, distill=-1.0)
    with pytest.raises(BenchError, match=r"^--device must be cpu or cuda, got 'tpu'$"):
        LatencyBenchConfig(device="tpu")


# ---------------------------------------------------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------------------------------------------------
def test_latency_rows_ratios_and_files(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    cfg = LatencyBenchConfig(**TINY, batch=2, repeats=1, warmup=1, rounds=2, ratios=(0.3, 0.5, 0.7), threads=2)
    result = bench_latency(cfg)
    assert torch.get_num_threads() == before  # restored
    t = result.table
    assert {"name", "gflops", "flops_ratio", "latency_ms", "latency_ratio", "quotient",
            "within_10pct"} <= set(t.columns)
    full = t.iloc[0]
    assert (full["name"] == "full" and full["flops_ratio"] == 1.0 and full["latency_ratio"] == 1.0
            and full["quotient"] == 1.0)
    assert ((t["flops_ratio"] > 0) & (t["flops_ratio"] <= 1)).all() and (t["latency_ms"] > 0).all()
    assert len(t) == 4 and (t.loc[1:, "kind"] == "uniform").all()
    np.testing.assert_allclose(t["quotient"], t["flops_ratio"] / t["latency_ratio"])
    assert (t.loc[1:, "flops_ratio"] < 1).all() and t["flops_ratio"].is_unique
    assert result.machine["threads"] == 2 and result.summary["threads"] == 2
    assert any("random weights" in n for n in result.notes)
    save_bench(result, tmp_path)
    doc = _check_files(tmp_path, "latency-cpu")
    assert doc["summary"]["target_met"] is False  # batch 2 < 8: never claimed
    assert pd.read_csv(tmp_path / "latency-cpu.csv").shape == t.shape


def test_uniform_subnets_are_balanced_and_nearest() -> None:
    config = get_config("DiT-B/2")
    full = closed_form_flops(config)
    for r in (0.3, 0.5, 0.7):
        s = uniform_at_ratio(config, r)
        assert abs(closed_form_flops(config, s) / full - r) < 0.05
        b = s.blocks[0]
        assert len(set(s.blocks)) == 1 and abs(b.heads - b.mlp_hidden // config.mlp_group_size) <= 1
        assert b.token_ratio == 1.0


def test_mixed_subnets_are_irregular_and_at_the_ratio() -> None:
    import random

    from dynasearch.bench.subnet_latency import latency_models, mixed_at_ratio
    from dynasearch.model import DiT

    config = get_config("DiT-B/2")
    full = closed_form_flops(config)
    for r in (0.3, 0.5, 0.7):
        s = mixed_at_ratio(config, r, random.Random(0))
        assert s is not None and abs(closed_form_flops(config, s) / full - r) <= 0.02 * r
        assert len(set(s.blocks)) > 1  # per-block choices, not a uniform subnet
    assert mixed_at_ratio(config, 0.01, random.Random(0), tries=50) is None  # below the space's smallest subnet
    cfg = LatencyBenchConfig(**TINY, batch=1, repeats=1, warmup=0, rounds=1, ratios=(0.5, 0.01), mixed=1)
    notes: list[str] = []
    entries = latency_models(cfg, DiT(get_config(TINY["model"], input_size=TINY["input_size"],
                                                 in_channels=TINY["in_channels"], num_classes=TINY["num_classes"])),
                             notes)
    kinds = [k for _, k, _ in entries]
    assert kinds.count("mixed") <= 1
    assert any("no random blockwise subnet within 2% of FLOPs ratio 0.01" in n for n in notes)
    with pytest.raises(BenchError, match="--mixed must be 0 or more, got -1"):
        LatencyBenchConfig(**TINY, mixed=-1)


def test_latency_with_searched_subnets(run_dir: Path, tmp_path: Path) -> None:
    space, config = load_space("blockwise"), get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    results = tmp_path / "search"
    for name, subnet in (("best", space.smallest(config)), ("pareto-01", space.uniform(config, 0.5, 0.5, 0.75))):
        (results / "subnets" / name).mkdir(parents=True)
        subnet.save(results / "subnets" / name / "subnet.json")
    (results / "best.json").write_text(json.dumps({"settings": {"supernet": str(run_dir)}}))
    result = bench_latency(LatencyBenchConfig(**TINY, batch=1, repeats=1, warmup=0, rounds=1, ratios=(0.5,),
                                              search_results=results))
    t = result.table
    assert list(t["kind"]) == ["full", "uniform", "searched", "searched"]
    assert set(t["name"]) >= {"searched-best", "searched-pareto-01"}
    assert any(str(run_dir) in n for n in result.notes)  # the supernet named by best.json was used
    with pytest.raises(BenchError, match="subnets/"):
        bench_latency(LatencyBenchConfig(**TINY, repeats=1, search_results=tmp_path, supernet=run_dir))


# ---------------------------------------------------------------------------------------------------------------------
# flops
# ---------------------------------------------------------------------------------------------------------------------
def test_flops_fvcore_equals_closed_form(tmp_path: Path) -> None:
    result = bench_flops(FlopsBenchConfig(models=("DiT-N/2", "DiT-N/8"), input_size=8, in_channels=1, num_classes=10))
    t = result.table
    assert list(t["model"]) == ["DiT-N/2", "DiT-N/8"]
    assert t["match"].all() and t["params_match"].all() and result.summary["all_match"]
    assert (t["gflops_fvcore"] == t["gflops_closed_form"]).all() and (t["gflops_fvcore"] > 0).all()
    assert "aten::scaled_dot_product_attention" not in result.summary["fvcore_skipped_ops"]
    save_bench(result, tmp_path)
    _check_files(tmp_path, "flops")
    with pytest.raises(BenchError, match="DiT-Q/2"):
        FlopsBenchConfig(models=("DiT-Q/2",))


# ---------------------------------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------------------------------
def test_hypervolume_helpers() -> None:
    g = np.array([0.5, 0.2, 0.1, 0.2])
    loss = np.array([2.0, 2.5, 0.1, np.nan])  # the third is over budget, the fourth failed
    curve = hypervolume_curve(g, loss, np.array([True, True, False, True]), (1.0, 3.0))
    np.testing.assert_allclose(curve, [0.5, 0.5 + 0.3 * 0.5, 0.65, 0.65])
    assert trials_to_reach(curve, 0.65) == 2 and trials_to_reach(curve, 5.0) is None


def test_search_hypervolume_curves(run_dir: Path, tmp_path: Path) -> None:
    cfg = SearchBenchConfig(supernet=run_dir, trials=6, seeds=2, proxy_samples=32)
    result = bench_search(cfg)
    t, c = result.table, result.extra["curves"]
    assert list(t["sampler"]) == ["tpe", "nsga2", "gp", "random", "random-feasible"]
    assert {"final_hv_mean", "trials_to_random_final", "fraction_of_trials", "goal_met"} <= set(t.columns)
    # random-feasible spends no trial over budget once the three enqueued subnets (largest, smallest, uniform) ran
    strong = c[(c["sampler"] == "random-feasible") & (c["trial"] > 3)]
    assert len(strong) == 2 * 3 and strong["feasible"].all()
    fractions = c.groupby("sampler")["feasible"].mean()
    np.testing.assert_allclose(t.set_index("sampler")["feasible_fraction"], fractions[t["sampler"]].to_numpy())
    per_seed = t.set_index("sampler").loc["random", "trials_to_random_final_per_seed"].split()
    assert len(per_seed) == 2  # one entry per seed, '-' where that seed never reached random's final mean
    for (_sampler, _seed), run in c.groupby(["sampler", "seed"]):
        assert list(run["trial"]) == list(range(1, 7))
        assert (np.diff(run["hypervolume"].to_numpy()) >= 0).all() and (run["hypervolume"] >= 0).all()
    # random reaches its own final mean at the latest on its last trial
    assert 1 <= t.set_index("sampler").loc["random", "trials_to_random_final"] <= 6
    ref = result.summary["reference"]
    assert ref["proxy_loss"] == pytest.approx(c["proxy_loss"].max())
    assert ref["gflops"] == result.summary["budget_gflops"]
    assert result.summary["cache_hits"] > 0  # the seeded trials repeat across runs
    mean = result.extra["mean"]
    assert list(mean.columns) == ["trial", "tpe", "nsga2", "gp", "random", "random-feasible"] and len(mean) == 6
    np.testing.assert_allclose(mean["random"], c[c["sampler"] == "random"].groupby("trial")["hypervolume"].mean())
    save_bench(result, tmp_path)
    _check_files(tmp_path, "search", extra=("curves", "mean"))
    assert not list(tmp_path.glob("*.journal")) and not Path("study.journal").exists()  # studies stay in memory


def test_feasible_draws_fit_the_budget_and_are_seeded(run_dir: Path) -> None:
    from dynasearch.bench.samplers import feasible_draws
    from dynasearch.search.config import SearchConfig
    from dynasearch.search.context import prepare_search

    ctx = prepare_search(SearchConfig(supernet=run_dir, flops="0.4x", out=Path("."), proxy_samples=8))
    draws = feasible_draws(ctx, 20, seed=3)
    flops = [ctx.flops(ctx.subnet_from_params(p)) for p in draws]
    assert len(draws) == 20 and max(flops) <= ctx.budget
    assert len({tuple(sorted(p.items())) for p in draws}) > 1  # draws, not one subnet repeated
    assert draws == feasible_draws(ctx, 20, seed=3) and draws != feasible_draws(ctx, 20, seed=4)


# ---------------------------------------------------------------------------------------------------------------------
# ranking
# ---------------------------------------------------------------------------------------------------------------------
def test_spread_subnets_cover_the_flops_range() -> None:
    config = get_config("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    space = load_space("blockwise")
    subnets = spread_subnets(space, config, 5, seed=0)
    flops = [closed_form_flops(config, s) for s in subnets]
    assert len(set(subnets)) == 5 and flops == sorted(flops)
    assert subnets[0] == space.smallest(config) and subnets[-1] == space.largest(config)
    full = closed_form_flops(config)
    near = spread_subnets(space, config, 4, seed=0, flops_range=(0.45, 0.55))
    assert len(set(near)) == 4 and all(0.45 <= closed_form_flops(config, s) / full <= 0.55 for s in near)
    with pytest.raises(BenchError, match="--flops-range"):
        spread_subnets(space, config, 4, seed=0, flops_range=(0.5, 0.5001))


def test_ranking_tau(run_dir: Path, tmp_path: Path) -> None:
    cfg = RankingBenchConfig(supernet=run_dir, k=3, finetune_steps=2, batch_size=8, proxy_samples=32, eval_samples=48,
                             finetune_seeds=2, bootstrap=50, lr=1e-3)
    result = bench_ranking(cfg)
    t, s, runs = result.table, result.summary, result.extra["runs"]
    assert result.name == "ranking-proxy32"  # not the search's proxy size: its own file stem
    assert len(t) == 3 and (np.diff(t["gflops"]) > 0).all() and t["flops_ratio"].iloc[-1] == 1.0
    assert {"inherited_loss", "finetuned_loss", "rank_inherited", "rank_finetuned",
            "inherited_eval_loss"} <= set(t.columns)
    assert (t["finetuned_loss"] != t["inherited_eval_loss"]).all()  # the fine-tune moved the weights
    assert (t["inherited_loss"] != t["inherited_eval_loss"]).all()  # two different sets
    # two fine-tunes per subnet with different batch seeds; the table holds their mean
    assert len(runs) == 6 and sorted(set(runs["finetune_seed"])) == [0, 1]
    np.testing.assert_allclose(t["finetuned_loss"], runs.groupby("subnet")["finetuned_loss"].mean())
    assert (runs.groupby("subnet")["finetuned_loss"].nunique() == 2).all()
    from scipy.stats import kendalltau

    assert s["kendall_tau"] == pytest.approx(kendalltau(t["inherited_loss"], t["finetuned_loss"])[0])
    assert s["kendall_tau_same_set"] == pytest.approx(kendalltau(t["inherited_eval_loss"], t["finetuned_loss"])[0])
    lo, hi = s["tau_ci95"]
    assert lo is None or -1.0 <= lo <= hi <= 1.0
    # every proxy kind scores the same subnets; the full model (last row) is its own teacher
    assert (t["proxy_eps"] == t["inherited_loss"]).all() and (t["proxy_eps_evalset"] == t["inherited_eval_loss"]).all()
    for kind in ("teacher", "teacher_norm", "teacher_sample"):
        assert t[f"proxy_{kind}"].iloc[-1] == 0.0 and (t[f"proxy_{kind}"].iloc[:-1] > 0).all(), kind
    taus = result.extra["proxies"]
    assert list(taus["proxy"]) == ["eps", "teacher", "teacher-norm", "teacher-sample"]
    assert set(taus["ground_truth"]) == {"finetuned_loss"} and "finetuned_fd" not in t.columns  # no --fd-samples
    for r in taus.itertuples():
        column = "proxy_" + r.proxy.replace("-", "_")
        assert r.kendall_tau == pytest.approx(kendalltau(t[column], t["finetuned_loss"])[0])
        assert s["proxies"][r.proxy]["finetuned_loss"]["kendall_tau"] == pytest.approx(r.kendall_tau)
        assert r.score_s > 0 and r.setup_s >= 0
        assert np.isnan(r.tau_ci95_lo) or -1.0 <= r.tau_ci95_lo <= r.tau_ci95_hi <= 1.0
    assert s["best_proxy"]["finetuned_loss"]["kendall_tau"] == pytest.approx(taus["kendall_tau"].max())
    save_bench(result, tmp_path)
    _check_files(tmp_path, "ranking-proxy32", extra=("runs", "proxies"))
    doc = json.loads((tmp_path / "ranking-proxy32.json").read_text())
    assert "--finetune-seeds 2" in doc["command"] and "--eval-samples 48" in doc["command"]
    with pytest.raises(BenchError, match="--k"):
        RankingBenchConfig(k=2)
    with pytest.raises(BenchError, match=r"--lr-schedule.*'step'"):
        RankingBenchConfig(lr_schedule="step")
    with pytest.raises(BenchError, match=r"--eval-samples.*0"):
        RankingBenchConfig(eval_samples=0)


def test_ranking_mid_range_has_its_own_files(run_dir: Path, tmp_path: Path) -> None:
    cfg = RankingBenchConfig(supernet=run_dir, k=3, finetune_steps=1, batch_size=4, proxy_samples=16, eval_samples=16,
                             bootstrap=10, flops_range=(0.4, 0.9))
    result = bench_ranking(cfg)
    assert result.name == "ranking-0.4-0.9-proxy16"
    assert result.table["flops_ratio"].between(0.4, 0.9).all()
    save_bench(result, tmp_path)
    doc = _check_files(tmp_path, "ranking-0.4-0.9-proxy16", extra=("runs",))
    assert "--flops-range 0.4,0.9" in doc["command"] and not (tmp_path / "ranking.csv").exists()
    from dynasearch.bench.proxy_ranking import result_name

    assert result_name(RankingBenchConfig(proxy_samples=2048, flops_range=(0.4, 0.6))) == "ranking-0.4-0.6-proxy2048"
    assert result_name(RankingBenchConfig(proxy_samples=2048)) == "ranking-proxy2048"
    assert result_name(RankingBenchConfig()) == "ranking"


class _PixelFeatures:
    """A stand-in extractor: the flattened pixels as features, every sample called class 0."""

    name, num_features, accuracy = "pixels", 64, None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), dtype=torch.long)


def test_ranking_fd_ground_truth(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import dynasearch.bench.proxy_ranking as ranking
    from dynasearch.data import DataRecord, load_dataset
    from dynasearch.quality import evaluate_quality

    split = load_dataset("digits", val_fraction=0.1, seed=0)
    real = torch.cat([split.val_x, split.train_x])
    asked = []

    def pixel_quality(model, **kw):  # the quality module's own FD, in a pixel feature space (no classifier to train)
        asked.append(kw.pop("data"))
        kw.pop("status")
        return evaluate_quality(model, extractor=_PixelFeatures(), real_images=real, **kw)

    monkeypatch.setattr(ranking, "evaluate_quality", pixel_quality)
    cfg = RankingBenchConfig(supernet=run_dir, k=3, finetune_steps=1, batch_size=4, proxy_samples=16, eval_samples=16,
                             finetune_seeds=2, bootstrap=10, fd_samples=6, fd_steps=2)
    result = bench_ranking(cfg)
    t, runs, taus = result.table, result.extra["runs"], result.extra["proxies"]
    # every fine-tuned model is scored against the supernet's own training data (its checkpoint's record)
    assert asked == [DataRecord.from_config(json.loads((run_dir / "config.json").read_text()))] * 6
    assert str(asked[0].spec) == "digits"
    assert {"finetuned_fd", "finetuned_fd_std", "finetuned_class_accuracy"} <= set(t.columns)
    np.testing.assert_allclose(t["finetuned_fd"], runs.groupby("subnet")["finetuned_fd"].mean())
    np.testing.assert_allclose(runs["finetuned_class_accuracy"], 1 / 6)  # labels 0..5, every sample called 0
    assert len(taus) == 8 and set(taus["ground_truth"]) == {"finetuned_loss", "finetuned_fd"}
    from scipy.stats import kendalltau

    fd = taus[taus["ground_truth"] == "finetuned_fd"].set_index("proxy")
    assert fd.loc["teacher", "kendall_tau"] == pytest.approx(kendalltau(t["proxy_teacher"], t["finetuned_fd"])[0])
    assert result.summary["kendall_tau_fd_vs_loss"] == pytest.approx(
        kendalltau(t["finetuned_fd"], t["finetuned_loss"])[0]
    )
    # one run again by hand: the same fine-tune, then FD of 6 samples from the bench's seed
    from dynasearch.checkpoint.native import load_checkpoint
    from dynasearch.diffusion.factory import diffusion_for
    from dynasearch.model.subnet import Subnet
    from dynasearch.slicing import slice_subnet

    supernet = load_checkpoint(run_dir)
    torch.manual_seed(1)
    small = slice_subnet(supernet, Subnet.from_dict(json.loads(t["subnet_json"].iloc[0])))
    ranking.finetune(small, split, diffusion_for(supernet.config), 1, 4, cfg.lr, 1, torch.device("cpu"), "cosine")
    again = evaluate_quality(small, num=6, steps=2, seed=0, extractor=_PixelFeatures(), real_images=real)
    assert again.fd == pytest.approx(runs.set_index(["subnet", "finetune_seed"]).loc[(0, 1), "finetuned_fd"], rel=1e-5)
    assert "--fd-samples 6 --fd-steps 2" in result.command
    with pytest.raises(BenchError, match="--fd-samples must be 0"):
        RankingBenchConfig(fd_samples=1)
    with pytest.raises(BenchError, match="--proxy-samples must be at least 8"):
        RankingBenchConfig(proxy_samples=4)


def test_finetune_lr_schedule() -> None:
    from dynasearch.bench.proxy_ranking import finetune_lr

    assert [finetune_lr(1e-3, "constant", s, 100) for s in (1, 50, 100)] == [1e-3] * 3
    cosine = [finetune_lr(1e-3, "cosine", s, 100) for s in range(1, 101)]
    assert cosine[0] == pytest.approx(2e-4) and cosine[4] == pytest.approx(1e-3)  # 5 warm-up steps
    assert all(a >= b for a, b in itertools.pairwise(cosine[4:])) and cosine[-1] == pytest.approx(0.0, abs=1e-12)


def test_kendall_bootstrap_interval() -> None:
    from dynasearch.bench.proxy_ranking import kendall_bootstrap

    a = np.arange(10.0)
    assert kendall_bootstrap(a, a, 200) == pytest.approx((1.0, 1.0))  # resampled pairs stay perfectly concordant
    lo, hi = kendall_bootstrap(a, np.random.default_rng(0).permutation(a), 200)
    assert -1.0 <= lo < hi <= 1.0
    with pytest.raises(BenchError, match="--flops-range"):
        RankingBenchConfig(flops_range=(0.6, 0.4))


# ---------------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------------
def test_train_overhead(tmp_path: Path) -> None:
    result = bench_train(TrainBenchConfig(model="DiT-N/2", steps=2, warmup=1, batch_size=8, sandwich=1))
    t = result.table.set_index("part")
    assert list(t.index) == ["max subnet", "min subnet", "random subnets (each)", "subnets alone, summed",
                             "sandwich step"]
    assert t.loc["max subnet", "measured_over_ideal"] == pytest.approx(1.0)  # the ideal is scaled from the largest
    assert (t["measured_ms"] > 0).all() and (t["ideal_ms"] > 0).all()
    steps = result.extra["steps"]
    assert list(steps["step"]) == [2, 3] and result.summary["subnets_per_step"] == 3
    np.testing.assert_allclose(steps["overhead"], steps["sandwich_ms"] / steps["ideal_ms"])
    assert len(result.extra["subnets"]) == 2 * 3
    save_bench(result, tmp_path)
    _check_files(tmp_path, "train-cpu", extra=("steps", "subnets"))


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_flops_and_recorded_command_reproduces(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "flops", "--models", "DiT-N/2,DiT-N/4", "--input-size", "8", "--in-channels", "1",
                 "--num-classes", "10", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DiT-N/4" in printed and "flops.csv" in printed
    doc = _check_files(out, "flops")
    first = pd.read_csv(out / "flops.csv")
    again = tmp_path / "again"
    argv = shlex.split(doc["command"].replace(f"--out {out}", f"--out {again}"))
    assert argv[:3] == ["dynasearch", "bench", "flops"] and main(argv[1:]) == 0
    second = pd.read_csv(again / "flops.csv")
    pd.testing.assert_frame_equal(first.drop(columns=["build_s", "count_s"]),
                                  second.drop(columns=["build_s", "count_s"]))


def test_cli_train_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "train", "--model", "DiT-N/2", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                 "--sandwich", "0", "--threads", "1", "--out", str(out)]) == 0
    _check_files(out, "train-cpu", extra=("steps", "subnets"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "latency", "--batch", "0"], "--batch"),
        (["bench", "latency", "--ratios", "0.5,1.5"], "--ratios"),
        (["bench", "latency", "--model", "DiT-Q/2"], "DiT-Q/2"),
        (["bench", "search", "--samplers", "tpe,annealing"], "annealing"),
        (["bench", "ranking", "--supernet", "does-not-exist"], "does-not-exist"),
        (["bench", "train", "--device", "tpu"], "tpu"),
        (["bench", "ranking", "--flops-range", "0.5"], "--flops-range"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv: list[str], words: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not out.exists()
