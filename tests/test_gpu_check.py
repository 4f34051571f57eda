"""`dynasearch bench gpu --tiny`: the prepared GPU check's whole code path on the CPU (DiT-N/2, 8x8x1), seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dynasearch.bench import GpuCheckConfig, bench_gpu
from dynasearch.bench.common import BenchError
from dynasearch.cli import main
from dynasearch.cost.latency_table import LatencyTable


def test_tiny_check_runs_every_part() -> None:
    cfg = GpuCheckConfig(device="cpu", tiny=True, batches=(2,), ratios=(0.5,), compile=False, repeats=1, warmup=0,
                         train_batch=4, train_steps=1, proxy_samples=16, proxy_trials=2)
    result = bench_gpu(cfg)
    t = result.table
    assert result.name == "gpu-cpu"
    assert list(t["name"]) == ["full", "uniform-0.50", "mixed-0.50"]
    assert (t["latency_per_flops"] * t["quotient"]).tolist() == pytest.approx([1.0] * 3)
    assert t["latency_ratio"].iloc[0] == 1.0 and t["flops_ratio"].iloc[1] == pytest.approx(0.5, abs=0.1)
    s = result.summary
    assert s["latency_target_met"] == bool((t[t["in_range"]]["latency_per_flops"] <= 1.10).all())
    assert s["proxy_trials_per_minute"] == pytest.approx(result.extra["proxy"]["trials_per_minute"].iloc[0])
    assert s["sandwich_peak_memory_gib"] is None  # CPU: no CUDA memory statistics
    assert set(result.extra) == {"table", "train", "proxy"}
    roles = list(result.extra["table"]["role"])
    assert roles == ["calibration"] * 2 + ["validation"] * 2  # the full model and the smallest; 2 random subnets
    assert result.latency_table.model.name == "DiT-N/2" and result.latency_table.batch == 2


def test_config_checks() -> None:
    with pytest.raises(BenchError, match="--batches must be positive integers"):
        GpuCheckConfig(device="cpu", batches=(0,))
    with pytest.raises(BenchError, match="--compile-ratios must be numbers"):
        GpuCheckConfig(device="cpu", compile_ratios=(2.0,))


def test_cli_writes_the_files(capsys, tmp_path: Path) -> None:
    code = main(["bench", "gpu", "--device", "cpu", "--tiny", "--no-compile", "--batches", "2", "--ratios", "0.5",
                 "--repeats", "1", "--warmup", "0", "--train-batch", "4", "--train-steps", "1", "--proxy-samples",
                 "16", "--proxy-trials", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    names = {p.name for p in tmp_path.iterdir()}
    assert {"gpu-cpu.csv", "gpu-cpu.json", "gpu-cpu.png", "gpu-cpu_table.csv", "gpu-cpu_train.csv",
            "gpu-cpu_proxy.csv", "gpu-cpu.table.json"} <= names
    sidecar = json.loads((tmp_path / "gpu-cpu.json").read_text())
    assert sidecar["command"].startswith("dynasearch bench gpu --device cpu --tiny --batches 2")
    assert LatencyTable.load(tmp_path / "gpu-cpu.table.json").batch == 2
    assert len(pd.read_csv(tmp_path / "gpu-cpu.csv")) >= 2
    assert "trials/min" in out
