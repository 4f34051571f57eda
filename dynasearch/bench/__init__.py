"""Benchmarks that back the claims with measurements:
`dynasearch bench latency|latency-table|flops|search|ranking|train`.

Each benchmark is one library function taking a typed config and returning a :class:`BenchResult` (a DataFrame,
extra tables, a summary, the settings, the machine and a command line that reproduces it); :func:`save_bench` writes
NAME.csv, NAME.png and the NAME.json sidecar. Gathering and plotting are separate (:mod:`dynasearch.bench.plots`)::

    from dynasearch.bench import LatencyBenchConfig, bench_latency, save_bench

    result = bench_latency(LatencyBenchConfig(model="DiT-S/2", batch=8, threads=4))
    result.table                            # name, gflops, flops_ratio, latency_ms, latency_ratio, quotient, ...
    save_bench(result, "results/bench")     # latency-cpu.csv, latency-cpu.png, latency-cpu.json
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    BenchConfig,
    BenchError,
    BenchResult,
    command_line,
    machine_info,
    torch_threads,
    write_bench,
)
from .gpu_check import GpuCheckConfig, bench_gpu
from .latency_table import LatencyTableConfig, LatencyTableResult, bench_latency_table
from .plots import plot_for
from .proxy_ranking import RankingBenchConfig, bench_ranking, spread_subnets
from .registry_flops import FlopsBenchConfig, bench_flops
from .samplers import (
    SearchBenchConfig,
    bench_search,
    hypervolume_curve,
    trials_to_reach,
)
from .sandwich_overhead import TrainBenchConfig, bench_train
from .subnet_latency import LatencyBenchConfig, bench_latency, uniform_at_ratio

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "FlopsBenchConfig",
    "GpuCheckConfig",
    "LatencyBenchConfig",
    "LatencyTableConfig",
    "LatencyTableResult",
    "RankingBenchConfig",
    "SearchBenchConfig",
    "TrainBenchConfig",
    "bench_flops",
    "bench_gpu",
    "bench_latency",
    "bench_latency_table",
    "bench_ranking",
    "bench_search",
    "bench_train",
    "command_line",
    "hypervolume_curve",
    "machine_info",
    "save_bench",
    "spread_subnets",
    "torch_threads",
    "trials_to_reach",
    "uniform_at_ratio",
    "write_bench",
]


def save_bench(result: BenchResult, out: str | Path = "results/bench") -> list[Path]:
    """Write a result's CSV(s), its figure and its JSON sidecar into `out`; returns the paths."""
    return write_bench(result, out, plot_for(result))
