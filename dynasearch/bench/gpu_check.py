"""`dynasearch bench gpu`: the one prepared GPU check, every CUDA claim measured in one run (under 8 minutes on one
GPU for DiT-XL/2; `--tiny`: DiT-N/2 at 8x8x1 on any device, seconds, for the tests).

1. Latency quotients in bf16 (fp32 on a CPU): sliced uniform and random per-block subnets at FLOPs ratios
   0.3-0.7 against the full model, at each batch (default 32 and 64), eager and, for `compile_ratios`, also
   under ``torch.compile``. ``latency_per_flops`` = latency ratio / FLOPs ratio (target <= 1.10 in [0.3, 0.7]);
   ``quotient`` is its inverse, the figure of ``dynasearch bench latency``.
2. The latency table (:mod:`dynasearch.bench.latency_table`) at the first batch, and its prediction error.
3. A sandwich training step (:mod:`dynasearch.bench.sandwich_overhead`): time against its FLOPs-proportional
   ideal (target <= 1.15x), images per second and peak memory.
4. Proxy-evaluation throughput: trials per minute with `proxy_samples` quadruples (random latents).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..cost.flops import closed_form_flops
from ..cost.latency import measure_latency
from ..diffusion.factory import diffusion_for
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..search.proxy import ProxyEvaluator, build_proxy_set
from ..slicing import slice_subnet
from ..space import load_space
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line
from .latency_table import LatencyTableConfig, LatencyTableResult, bench_latency_table
from .sandwich_overhead import TrainBenchConfig, bench_train
from .subnet_latency import mixed_at_ratio, uniform_at_ratio

__all__ = ["GpuCheckConfig", "bench_gpu"]

TARGET_LATENCY_PER_FLOPS, TARGET_SANDWICH = 1.10, 1.15
RANGE = (0.3, 0.7)


@dataclass(frozen=True)
class GpuCheckConfig(BenchConfig):
    """What the GPU check measures; `tiny` swaps every model for DiT-N/2 at 8x8x1 (for the tests)."""

    device: str = "cuda"
    tiny: bool = False
    batches: tuple[int, ...] = (32, 64)
    ratios: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    compile: bool = True
    compile_ratios: tuple[float, ...] = (0.5,)
    repeats: int = 20
    warmup: int = 5
    train_batch: int = 32
    train_steps: int = 5
    proxy_samples: int = 512
    proxy_trials: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_positive("repeats", "train_batch", "train_steps", "proxy_samples", "proxy_trials")
        self.check_non_negative("warmup")
        self.check_device()
        for name in ("batches", "ratios"):
            if not getattr(self, name):
                raise BenchError(f"--{name} must name at least one value")
        for b in self.batches:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise BenchError(f"--batches must be positive integers, got {b!r}")
        for r in (*self.ratios, *self.compile_ratios):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise BenchError(f"--ratios and --compile-ratios must be numbers in (0, 1], got {r!r}")

    @property
    def model_config(self) -> DiTConfig:
        """DiT-XL/2 at 32x32x4 latents, or DiT-N/2 at 8x8x1 with `tiny`."""
        if self.tiny:
            return get_config("DiT-N/2", input_size=8, in_channels=1, num_classes=10)
        return get_config("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)


def _subnets(config: DiTConfig, cfg: GpuCheckConfig) -> list[tuple[str, str, float, Subnet]]:
    """(name, kind, ratio, subnet): the full model, a uniform and a random per-block subnet per FLOPs ratio."""
    rng = random.Random(cfg.seed)
    out = [("full", "full", 1.0, Subnet.full(config))]
    for r in cfg.ratios:
        out.append((f"uniform-{r:.2f}", "uniform", r, uniform_at_ratio(config, r)))
        mixed = mixed_at_ratio(config, r, rng)
        if mixed is not None:
            out.append((f"mixed-{r:.2f}", "mixed", r, mixed))
    return out


def _quotients(model: DiT, cfg: GpuCheckConfig, device: torch.device, status: Callable[[str], None]) -> pd.DataFrame:
    """Latency of every subnet at every batch, eager and compiled, against the full model's."""
    config, dtype = model.config, torch.bfloat16 if device.type == "cuda" else None
    full_flops, rows = closed_form_flops(config), []
    entries = _subnets(config, cfg)
    for batch in cfg.batches:
        for compiled in (False, True) if cfg.compile else (False,):
            full_latency = None
            for name, kind, ratio, subnet in entries:
                if compiled and kind != "full" and not any(abs(ratio - c) < 1e-9 for c in cfg.compile_ratios):
                    continue
                status(f"latency: batch {batch}, {'compiled' if compiled else 'eager'}, {name}")
                small = slice_subnet(model, subnet).eval()
                runner = torch.compile(small) if compiled else small
                seconds = measure_latency(runner, batch=batch, warmup=cfg.warmup, repeats=cfg.repeats, dtype=dtype)
                full_latency = seconds if kind == "full" else full_latency
                assert full_latency is not None
                flops_ratio = closed_form_flops(config, subnet) / full_flops
                latency_ratio = seconds / full_latency
                rows.append({"batch": batch, "compiled": compiled, "name": name, "kind": kind,
                             "flops_ratio": flops_ratio, "latency_ms": seconds * 1e3, "latency_ratio": latency_ratio,
                             "latency_per_flops": latency_ratio / flops_ratio, "quotient": flops_ratio / latency_ratio,
                             "in_range": RANGE[0] <= flops_ratio <= RANGE[1]})
                del small, runner
    return pd.DataFrame(rows)


def _latency_table(cfg: GpuCheckConfig, status: Callable[[str], None]) -> LatencyTableResult:
    """The latency table of the check's model at its first batch, in bf16 on CUDA."""
    config = cfg.model_config
    table_cfg = LatencyTableConfig(
        model=config.name, input_size=config.input_size, in_channels=config.in_channels,
        num_classes=config.num_classes, batch=cfg.batches[0], device=cfg.device,
        dtype="bf16" if cfg.device == "cuda" else "fp32", repeats=cfg.repeats, warmup=cfg.warmup,
        validate=8 if not cfg.tiny else 2, calibrate=4 if not cfg.tiny else 2,
        copies=4 if not cfg.tiny else 1, seed=cfg.seed)
    return bench_latency_table(table_cfg, status)


def _train(
    cfg: GpuCheckConfig, device: torch.device, status: Callable[[str], None]
) -> tuple[BenchResult, float | None]:
    """The sandwich step of the check's model (digits resized to its input side) and its peak memory (GiB)."""
    config = cfg.model_config
    train_cfg = TrainBenchConfig(model=config.name, steps=cfg.train_steps, warmup=2 if not cfg.tiny else 1,
                                 batch_size=cfg.train_batch, image_size=config.input_size, device=cfg.device,
                                 seed=cfg.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = bench_train(train_cfg, status)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result, peak


def _proxy(model: DiT, cfg: GpuCheckConfig, device: torch.device) -> dict[str, Any]:
    """Trials per minute of the eps proxy with `proxy_samples` quadruples on random latents."""
    config = model.config
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(64, config.in_channels, config.input_size, config.input_size, generator=gen)
    labels = torch.randint(0, config.num_classes, (64,), generator=gen)
    proxy = build_proxy_set(images, labels, diffusion_for(config), num=cfg.proxy_samples, seed=cfg.seed)
    evaluator = ProxyEvaluator(model, proxy)
    space, rng = load_space("blockwise"), random.Random(cfg.seed)
    evaluator(space.sample(config, rng))  # warm-up
    times = []
    for _ in range(cfg.proxy_trials):
        subnet = space.sample(config, rng)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        evaluator(subnet)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"proxy_samples": cfg.proxy_samples, "trials": cfg.proxy_trials, "seconds_per_trial": seconds,
            "trials_per_minute": 60.0 / seconds}


def bench_gpu(cfg: GpuCheckConfig, status: Callable[[str], None] | None = None) -> LatencyTableResult:
    """Run every part of the check; the main table is the latency quotients, the rest are extra tables."""
    status = status or (lambda _m: None)
    config = cfg.model_config
    notes = [f"model {config.name} at {config.input_size}x{config.input_size}x{config.in_channels}, random weights"]
    with bench_run(cfg.device, None) as run:
        torch.manual_seed(cfg.seed)
        model = DiT(config).to(run.device).eval()
        quotients = _quotients(model, cfg, run.device, status)
        status("proxy throughput")
        proxy = _proxy(model, cfg, run.device)
        del model
        table = _latency_table(cfg, status)
        train, peak = _train(cfg, run.device, status)
    in_range = quotients[quotients["in_range"]]
    worst = (in_range.groupby(["batch", "compiled"])["latency_per_flops"].max() if len(in_range)
             else pd.Series(dtype=float))
    summary = {
        "model": config.name,
        "device": run.device.type,
        "device_name": run.machine["device_name"],
        "dtype": "bfloat16 autocast" if run.device.type == "cuda" else "float32",
        "latency_per_flops_max_in_range": {f"batch {b}, {'compiled' if c else 'eager'}": float(v)
                                           for (b, c), v in worst.items()},
        "latency_target": f"latency ratio / FLOPs ratio <= {TARGET_LATENCY_PER_FLOPS} at FLOPs ratios {RANGE}",
        "latency_target_met": bool(len(worst) and (worst <= TARGET_LATENCY_PER_FLOPS).all()),
        "table_median_abs_error_pct": table.summary["median_abs_error_pct"],
        "table_max_abs_error_pct": table.summary["max_abs_error_pct"],
        "sandwich_over_ideal": train.summary["overhead_median"],
        "sandwich_target": f"sandwich step <= {TARGET_SANDWICH}x its FLOPs-proportional ideal",
        "sandwich_target_met": bool(train.summary["overhead_median"] <= TARGET_SANDWICH),
        "sandwich_images_per_s": cfg.train_batch / (train.summary["sandwich_ms_median"] / 1e3),
        "sandwich_peak_memory_gib": peak,
        "proxy_trials_per_minute": proxy["trials_per_minute"],
    }
    if run.device.type != "cuda":
        notes.append("not a GPU: this run only checks the code path (the targets are stated for CUDA, bf16)")
    settings = {**asdict(cfg), "model": config.name}
    extra = {"table": table.table, "train": train.table, "proxy": pd.DataFrame([proxy])}
    return LatencyTableResult(f"gpu-{run.device.type}", quotients, summary, settings, command_line("gpu", cfg),
                              run.machine, extra=extra, notes=notes, latency_table=table.latency_table)
