"""Timestep-aware search end to end: bucket studies + knapsack vs joint, exports, and per-step subnet switching."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import fake_supernet_run

from dynasearch.checkpoint.native import load_checkpoint, read_config, read_schedule
from dynasearch.cost.flops import bucket_flops, closed_form_flops, mean_flops
from dynasearch.diffusion.gaussian import GaussianDiffusion
from dynasearch.errors import SearchError
from dynasearch.model import create_supernet
from dynasearch.model.schedule import SubnetSchedule, TimestepBuckets
from dynasearch.model.subnet import Subnet
from dynasearch.sampling import sample_images
from dynasearch.search import run_search
from dynasearch.search.config import SearchConfig, TimestepSettings, is_timestep_space
from dynasearch.search.timestep import TimestepSearchResult, export_schedule, run_timestep_search
from dynasearch.slicing import slice_schedule


class StepFlops:
    """Counts the FLOPs every forward pass really executes, from the shapes its layers see (hooks, no closed form)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[int] = []
        self._current = 0
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._end)]
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                self._handles.append(module.register_forward_hook(self._count))
            if module.__class__.__name__ == "Attention":
                self._handles.append(module.proj.register_forward_hook(self._sdpa))

    def _start(self, _m: nn.Module, _args: tuple) -> None:
        self._current = 0

    def _end(self, _m: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        self.calls.append(self._current // args[0].shape[0])  # per sample

    def _count(self, m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        if isinstance(m, nn.Linear):
            self._current += out.numel() * x.shape[-1]  # rows x out x in (q/k/v come back split into heads)
        elif isinstance(m, nn.Conv2d):
            self._current += out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            self._current += 4 * x.numel()  # fvcore's LayerNorm cost, no affine

    def _sdpa(self, _m: nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x = args[0]  # (B, N, heads * head_dim): the attention output the heads produced
        self._current += 2 * x.shape[0] * x.shape[1] * x.shape[1] * x.shape[2]

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _schedule(model, top: float = 1.0) -> SubnetSchedule:
    c = model.config
    return SubnetSchedule(TimestepBuckets.equal(4), (
        Subnet.uniform(c, top, top, 1.0), Subnet.uniform(c, 0.5, 0.75, 1.0),
        Subnet.uniform(c, 0.5, 0.5, 0.75), Subnet.uniform(c, 0.25, 0.25, 0.5),
    ))


def test_sampler_runs_each_bucket_subnet_at_its_steps() -> None:
    torch.manual_seed(0)
    model = create_supernet("DiT-N/2", input_size=8, in_channels=1, num_classes=10).eval()
    schedule = _schedule(model)
    expected = bucket_flops(schedule, model.config)
    assert len(set(expected)) == 4  # the buckets really differ, so the count below can tell them apart
    counter = StepFlops(model)
    try:
        static = [closed_form_flops(model.config, s) for s in schedule.subnets]
        for subnet, flops in zip(schedule.subnets, static, strict=True):  # the hook count is exact for a plain forward
            model(torch.randn(2, 1, 8, 8), torch.tensor([10, 10]), torch.tensor([1, 2]), subnet=subnet)
            assert counter.calls[-1] == flops
        counter.calls.clear()
        sample_images(model, [0, 1, 2], cfg_scale=1.0, steps=20, subnet=schedule)
    finally:
        counter.close()
    timesteps = GaussianDiffusion().timestep_schedule(20)
    assert counter.calls == [expected[schedule.buckets.bucket_of(t)] for t in timesteps]
    assert sum(counter.calls) / 20 == pytest.approx(mean_flops(schedule, model.config, timesteps))


def test_mixed_timesteps_in_one_batch_run_their_own_subnets() -> None:
    torch.manual_seed(0)
    model = create_supernet("DiT-N/2", input_size=8, in_channels=1, num_classes=10).eval()
    schedule = _schedule(model)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([900, 10, 600, 300]), torch.tensor([0, 1, 2, 3])
    from dynasearch.sampling import run_schedule

    with torch.no_grad():
        out = run_schedule(model, schedule, x, t, y)
        for i in range(4):
            alone = model(x[i : i + 1], t[i : i + 1], y[i : i + 1], subnet=schedule.subnet_at(int(t[i])),
                          label_dropout=False)
            torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_timestep_dynamic_export_round_trip_on_dit_s8(tmp_path: Path) -> None:
    """A registry model: the exported union runs every bucket exactly like the supernet did."""
    torch.manual_seed(0)
    model = create_supernet("DiT-S/8").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    schedule = _schedule(model, top=0.75)
    timesteps = GaussianDiffusion().timestep_schedule(50)
    info = export_schedule(model, schedule, tmp_path / "ckpt", timesteps, {"method": "test"})
    doc = read_config(tmp_path / "ckpt")
    assert doc["kind"] == "timestep-dynamic"
    small = load_checkpoint(tmp_path / "ckpt")
    assert read_schedule(doc, small.config, tmp_path / "ckpt") == schedule
    assert info["mean_gflops"] == pytest.approx(mean_flops(schedule, model.config, timesteps) / 1e9)
    assert small.config.block_heads == tuple(b.heads for b in schedule.union().blocks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x, y = torch.randn(2, 4, 32, 32), torch.tensor([3, 7])
    with torch.no_grad():
        for k, subnet in enumerate(schedule.subnets):
            t = torch.full((2,), schedule.buckets.boundaries[k] + 5)
            torch.testing.assert_close(small(x, t, y, subnet=subnet), model(x, t, y, subnet=subnet),
                                       rtol=1e-4, atol=1e-5)


def test_slice_schedule_equals_slicing_the_union() -> None:
    model = create_supernet("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
    schedule = _schedule(model)
    assert slice_schedule(model, schedule).config.block_mlp_hidden == tuple(
        b.mlp_hidden for b in schedule.union().blocks
    )


# ---------------------------------------------------------------------------------------------------- the search
@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("tsearch")
    run = fake_supernet_run(root / "run")
    reference = root / "reference.json"
    Subnet.uniform(load_checkpoint(run).config, 0.5, 0.5, 1.0).save(reference)
    config = SearchConfig(supernet=run, flops="0.5x", out=root / "out", space="timestep", trials=8, proxy_samples=64,
                          timestep=TimestepSettings(sample_steps=10, reference=reference))
    result = run_search(config, progress=False)  # the one entry point: the space makes it timestep-aware
    assert isinstance(result, TimestepSearchResult)
    return root, result


def test_search_compares_knapsack_joint_and_static(searched) -> None:
    root, result = searched
    out = root / "out"
    table = pd.read_csv(out / "schedules.csv")
    assert list(table["method"]) == ["knapsack", "joint", "static uniform", "static reference"]
    assert table["within_budget"].iloc[:3].all()
    knapsack, uniform = table.set_index("method").loc["knapsack"], table.set_index("method").loc["static uniform"]
    assert knapsack["proxy_loss"] <= uniform["proxy_loss"] + 1e-6  # the knapsack can always pick the best uniform
    assert table["winner"].sum() == 1
    best = json.loads((out / "best.json").read_text())
    assert best["method"] in ("knapsack", "joint") and best["steps_per_bucket"] == [3, 2, 2, 3]
    assert abs(best["knapsack_predicted_proxy"] - knapsack["proxy_loss"]) < 1e-5
    assert SubnetSchedule.from_dict(json.loads((out / "schedule.json").read_text())) == result.schedule
    buckets = pd.read_csv(out / "bucket_trials.csv")
    assert set(buckets["bucket"]) == {0, 1, 2, 3} and buckets["on_front"].any()
    assert (buckets[buckets["source"] == "trial"].groupby("bucket").size() == 8).all()
    assert len(pd.read_csv(out / "joint_trials.csv")) == 8
    for name in ("knapsack", "joint", "static-uniform", "static-reference"):
        assert read_config(out / "schedules" / name)["kind"] == "timestep-dynamic"


def test_rerun_resumes_without_new_trials(searched) -> None:
    root, result = searched
    journal = root / "out" / "study.journal"
    before = journal.read_bytes()
    config = SearchConfig(supernet=root / "run", flops="0.5x", out=root / "out", space="timestep", trials=8,
                          proxy_samples=64,
                          timestep=TimestepSettings(sample_steps=10, reference=root / "reference.json"))
    again = run_timestep_search(config, progress=False)
    assert again.schedule == result.schedule
    assert journal.read_bytes()[: len(before)] == before
    trials = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sum(1 for op in trials if op.get("op_code") == 4) == sum(
        1 for op in trials[: before.count(b"\n")] if op.get("op_code") == 4
    )


def test_static_space_and_bad_steps_are_refused(searched) -> None:
    root, _ = searched
    base = {"supernet": root / "run", "flops": "0.5x", "out": root / "other", "trials": 2, "proxy_samples": 64}
    with pytest.raises(SearchError, match="has no timestep_buckets"):
        run_timestep_search(SearchConfig(space="blockwise", **base), progress=False)
    with pytest.raises(SearchError,
                       match=r"--sample-steps 2 leaves timestep bucket 1 \(t 250-499\) without a sampling step"):
        run_search(SearchConfig(space="timestep", timestep=TimestepSettings(sample_steps=2), **base), progress=False)
    with pytest.raises(SearchError, match="--sample-steps must be a positive integer, got 0"):
        run_search(SearchConfig(space="timestep", timestep=TimestepSettings(sample_steps=0), **base), progress=False)
    assert not (root / "other").exists()


def test_report_of_a_timestep_search(searched) -> None:
    from dynasearch.report.build import ReportConfig, build_report
    from dynasearch.report.data import bucket_width_map, read_timestep_search

    root, result = searched
    out = root / "out"
    widths = bucket_width_map(read_timestep_search(out))
    assert widths.methods == ["knapsack", "joint", "static uniform", "static reference"]
    assert widths.attn.shape == (4, 4, 2)  # methods x buckets x blocks
    assert (widths.attn[3] == widths.attn[3][0]).all()  # a static schedule is the same in every bucket
    knapsack = SubnetSchedule.from_dict(json.loads(result.comparison.set_index("method").loc["knapsack", "schedule"]))
    assert widths.attn[0].tolist() == [[b.heads / 4 for b in s.blocks] for s in knapsack.subnets]
    assert widths.mlp[0].tolist() == [[b.mlp_hidden / 128 for b in s.blocks] for s in knapsack.subnets]
    report = build_report(ReportConfig(out, samples=True, eval_num=0, steps=4, latency_repeats=1))
    for name in ("buckets.png", "widths.png", "samples.png", "report.html", "report.md", "report.json"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert "Timestep-aware schedule" in page and "Schedules compared" in page
    assert list(report.models["model"]) == ["full model", "joint", "knapsack", "static-reference", "static-uniform"]
    summary = json.loads((out / "report.json").read_text())
    assert summary["best"]["method"] == result.best["method"]
    rows = report.models.set_index("model")
    assert rows.loc["full model", "% of full FLOPs"] == pytest.approx(100.0)
    for name in ("joint", "knapsack", "static-uniform"):  # the searched schedules keep the 0.5x budget
        assert rows.loc[name, "% of full FLOPs"] <= 50.0 + 1e-9
    table = result.comparison.set_index("method")
    assert rows.loc["knapsack", "% of full FLOPs"] == pytest.approx(100 * table.loc["knapsack", "flops_ratio"])
    assert any("search's 10 DDIM steps" in n for n in report.notes)


def test_cli_sample_eval_and_flops_understand_schedules(
    searched, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynasearch.cli import main

    root, result = searched
    monkeypatch.setenv("DYNASEARCH_CACHE", str(root / "cache"))  # the digit classifier is trained into the test's dir
    ckpt = root / "out" / "schedules" / "knapsack"
    png = root / "grid.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "0,1", "--per-label", "2", "--steps", "4",
                 "--out", str(png), "--device", "cpu"]) == 0
    assert png.is_file()
    capsys.readouterr()
    assert main(["flops", "--checkpoint", str(ckpt), "--sample-steps", "10", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    schedule = SubnetSchedule.from_dict(doc["schedule"])
    assert [b["steps"] for b in doc["buckets"]] == [3, 2, 2, 3]
    assert all(b["flops"] == b["flops_closed_form"] for b in doc["buckets"])  # fvcore agrees bucket by bucket
    mean = mean_flops(schedule, load_checkpoint(ckpt).config, GaussianDiffusion().timestep_schedule(10))
    assert doc["flops_closed_form"] == round(mean)
    assert doc["flops_closed_form"] / 1e9 == pytest.approx(
        result.comparison.set_index("method").loc["knapsack", "mean_gflops"]
    )
    # a supernet with the schedule file: the same per-step mean
    assert main(["flops", "--checkpoint", str(root / "run"), "--subnet", str(root / "out" / "schedule.json"),
                 "--sample-steps", "10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == round(
        mean_flops(result.schedule, load_checkpoint(ckpt).config, GaussianDiffusion().timestep_schedule(10))
    )
    assert main(["eval", "--checkpoint", str(ckpt), "--num", "20", "--steps", "2", "--device", "cpu", "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)
    assert quality["subnet"] == schedule.to_dict()
    assert quality["extra"]["gflops_per_step"] == pytest.approx(
        mean_flops(schedule, load_checkpoint(ckpt).config, GaussianDiffusion().timestep_schedule(2)) / 1e9
    )


def test_cli_search_with_a_timestep_space(searched, capsys: pytest.CaptureFixture[str]) -> None:
    from dynasearch.cli import main

    root, _ = searched
    out = root / "cli"
    base = ["search", "--supernet", str(root / "run"), "--flops", "0.5x", "--space", "timestep", "--trials", "3",
            "--proxy-samples", "64", "--out", str(out)]
    assert main([*base, "--sample-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --sample-steps 2 leaves timestep bucket 1 (t 250-499) without a sampling step; "
                   "use more steps or fewer buckets"]
    assert not out.exists()
    assert main([*base, "--sample-steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "knapsack" in printed and "winner" in printed
    table = pd.read_csv(out / "schedules.csv")
    assert list(table["method"]) == ["knapsack", "joint", "static uniform"] and table["winner"].sum() == 1
    assert json.loads((out / "best.json").read_text())["steps_per_bucket"] == [2, 2, 2, 2]


def test_library_run_search_with_a_timestep_space_writes_what_the_cli_writes(
    searched, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dynasearch.search.run_search` decides by the space: schedules, not static outputs, byte for byte the CLI's."""
    from dynasearch.cli import main

    root, _ = searched
    lib, cli = root / "library", root / "cli-twin"
    config = SearchConfig(supernet=root / "run", flops="0.5x", out=lib, space="timestep", trials=3, proxy_samples=64,
                          timestep=TimestepSettings(sample_steps=8))
    result = run_search(config, progress=False)
    assert isinstance(result, TimestepSearchResult)
    assert not (lib / "trials.csv").exists() and not (lib / "pareto.csv").exists() and not (lib / "subnets").exists()
    assert SubnetSchedule.from_dict(json.loads((lib / "schedule.json").read_text())) == result.schedule
    assert list(result.comparison["method"]) == ["knapsack", "joint", "static uniform"]
    assert main(["search", "--supernet", str(root / "run"), "--flops", "0.5x", "--space", "timestep", "--trials", "3",
                 "--proxy-samples", "64", "--sample-steps", "8", "--out", str(cli)]) == 0
    capsys.readouterr()
    for name in ("schedules.csv", "bucket_trials.csv", "joint_trials.csv", "schedule.json"):
        assert (lib / name).read_bytes() == (cli / name).read_bytes(), name
    for method in ("knapsack", "joint", "static-uniform"):
        assert ((lib / "schedules" / method / "config.json").read_bytes()
                == (cli / "schedules" / method / "config.json").read_bytes())
    best_lib, best_cli = (json.loads((out / "best.json").read_text()) for out in (lib, cli))
    assert best_lib["settings"].pop("storage") == str(lib / "study.journal")
    assert best_cli["settings"].pop("storage") == str(cli / "study.journal")
    assert best_lib == best_cli


def test_the_space_decides_which_search_runs(tmp_path: Path) -> None:
    """A given space, or else the supernet's training space, makes a search timestep-aware."""
    static_run = fake_supernet_run(tmp_path / "static")
    timestep_run = fake_supernet_run(tmp_path / "timestep", space="timestep")
    base = {"flops": "0.5x", "out": tmp_path / "out"}
    assert not is_timestep_space(SearchConfig(supernet=static_run, **base))
    assert is_timestep_space(SearchConfig(supernet=static_run, space="timestep", **base))
    assert is_timestep_space(SearchConfig(supernet=timestep_run, **base))
    assert not is_timestep_space(SearchConfig(supernet=timestep_run, space="blockwise", **base))


def test_ctrl_c_stops_the_timestep_search_and_the_printed_command_resumes(
    searched, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import shlex
    import signal

    from dynasearch.cli import main
    from dynasearch.search.proxy import ProxyEvaluator

    root, _ = searched
    out = root / "interrupted"
    calls = {"n": 0}
    real = ProxyEvaluator.per_sample

    def per_sample(self, subnet=None):  # Ctrl-C during the 5th evaluation (bucket 0's study)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, subnet)

    monkeypatch.setattr(ProxyEvaluator, "per_sample", per_sample)
    args = ["search", "--supernet", str(root / "run"), "--flops", "0.5x", "--space", "timestep", "--trials", "4",
            "--proxy-samples", "64", "--sample-steps", "8", "--out", str(out)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted after" in err
    resume = err.split("resume with: ", 1)[1].split(" (same --out)")[0].strip()
    assert "--space timestep" in resume and "--sample-steps 8" in resume
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert not (out / "schedules.csv").exists()  # outputs are only written by a finished run
    monkeypatch.setattr(ProxyEvaluator, "per_sample", real)
    assert main(shlex.split(resume)[1:]) == 0, capsys.readouterr().err
    buckets = pd.read_csv(out / "bucket_trials.csv")
    assert (buckets[buckets["source"] == "trial"].groupby("bucket").size() == 4).all()  # nothing lost or repeated
    assert len(pd.read_csv(out / "joint_trials.csv")) == 4
