"""`dynasearch bench train`: what the sandwich step costs against the FLOPs-proportional ideal of its subnets.

Per step (after warm-up steps), on one seeded batch and the step's sandwich subnets
(:func:`dynasearch.train.sandwich_subnets`): the whole :func:`dynasearch.train.sandwich_step` (forward + backward of
every subnet, distillation included) is timed, then each subnet's forward + backward on its own (the same function
with that one subnet). The ideal is ``(sum of the subnets' FLOPs / largest FLOPs) x (largest subnet's own time)``:
what the step would take if every subnet ran as fast per FLOP as the largest. overhead = measured / ideal.
No optimiser step is taken (the weights stay fixed, so every step costs alike).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..checks import SUBNET_BYTES, check_memory
from ..cost.flops import closed_form_flops
from ..data import load_dataset, parse_data_spec
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..space import DEFAULT_SPACE, load_space
from ..train.config import DATA_SPLIT_SEED
from ..train.sandwich import TrainBatch, draw_batch, sandwich_step, sandwich_subnets
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = ["TrainBenchConfig", "bench_train"]


@dataclass(frozen=True)
class TrainBenchConfig(BenchConfig):
    """Which model and data, how many timed steps."""

    model: str = "DiT-T/2"
    steps: int = 20
    warmup: int = 3
    batch_size: int = 64
    sandwich: int = 2
    distill: float = 1.0
    space: str = DEFAULT_SPACE
    data: str = "digits"
    image_size: int | None = None
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        self.check_positive("steps", "batch_size", "image_size", "threads")
        if self.image_size is not None:
            check_memory(4 * self.image_size**2, f"--image-size {self.image_size} (one image)", BenchError)
        check_memory(self.sandwich * SUBNET_BYTES, f"--sandwich {self.sandwich} (subnets per step)", BenchError)
        self.check_non_negative("warmup", "sandwich", "distill")
        self.check_device()
        self.check_seed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(
    model: DiT, diffusion: GaussianDiffusion, batch: TrainBatch, subnets: list[tuple[str, Subnet]],
    cfg: TrainBenchConfig, dtype: torch.dtype | None,
) -> tuple[float, list[float]]:
    """Seconds of the whole sandwich step, then of each subnet's forward + backward on its own (same batch)."""
    device = next(model.parameters()).device
    times = []
    for part in [subnets, *([one] for one in subnets)]:
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        sandwich_step(model, diffusion, batch, part, cfg.distill, dtype)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[0], times[1:]


def _step_rows(
    step: int, subnets: list[tuple[str, Subnet]], config: DiTConfig, cfg: TrainBenchConfig, measured: float,
    alone: list[float],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The step's row (sandwich against ideal) and one row per subnet (its time against its FLOPs-share ideal)."""
    flops = [closed_form_flops(config, s, batch=cfg.batch_size) for _, s in subnets]
    largest = flops[0]
    ideal = sum(flops) / largest * alone[0]
    step_row = {"step": step, "sandwich_ms": measured * 1e3, "alone_sum_ms": sum(alone) * 1e3,
                "ideal_ms": ideal * 1e3, "overhead": measured / ideal, "gflops": sum(flops) / 1e9}
    roles = []
    for (name, _), f, sec in zip(subnets, flops, alone, strict=True):
        role = "random" if name.startswith("random") else name
        ideal_role = f / largest * alone[0]
        roles.append({"step": step, "role": role, "subnet": name, "gflops": f / 1e9, "ms": sec * 1e3,
                      "ideal_ms": ideal_role * 1e3, "time_over_ideal": sec / ideal_role})
    return step_row, roles


def _parts_table(per_step: pd.DataFrame, per_role: pd.DataFrame) -> pd.DataFrame:
    """Median time against ideal of the max, min and random subnets, of all subnets alone and of the whole step."""
    rows = []
    for role in ("max", "min", "random"):
        r = per_role[per_role["role"] == role]
        if r.empty:
            continue
        rows.append({"part": f"{role} subnet" + ("s (each)" if role == "random" else ""),
                     "fwd_gflops": r["gflops"].mean(), "measured_ms": r["ms"].median(),
                     "ideal_ms": r["ideal_ms"].median(), "measured_over_ideal": r["time_over_ideal"].median()})
    rows.append({"part": "subnets alone, summed", "fwd_gflops": per_step["gflops"].mean(),
                 "measured_ms": per_step["alone_sum_ms"].median(), "ideal_ms": per_step["ideal_ms"].median(),
                 "measured_over_ideal": (per_step["alone_sum_ms"] / per_step["ideal_ms"]).median()})
    rows.append({"part": "sandwich step", "fwd_gflops": per_step["gflops"].mean(),
                 "measured_ms": per_step["sandwich_ms"].median(), "ideal_ms": per_step["ideal_ms"].median(),
                 "measured_over_ideal": per_step["overhead"].median()})
    return pd.DataFrame(rows)


def bench_train(cfg: TrainBenchConfig, status: Callable[[str], None] | None = None) -> BenchResult:
    """Per-role fwd+bwd time against the FLOPs-proportional ideal, and the whole step's overhead."""
    status = status or (lambda _m: None)
    with bench_run(cfg.device, cfg.threads) as run:
        device = run.device
        split = load_dataset(parse_data_spec(cfg.data), image_size=cfg.image_size, seed=DATA_SPLIT_SEED)
        config = get_config(cfg.model, input_size=split.image_size, in_channels=split.in_channels,
                            num_classes=split.num_classes)
        config.check_memory()
        config.check_batch(cfg.batch_size, "--batch-size")
        space = load_space(cfg.space)
        space.validate_for(config)
        torch.manual_seed(cfg.seed)
        model = DiT(config).to(device).train()
        diffusion = diffusion_for(config)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        steps: list[dict[str, Any]] = []
        roles: list[dict[str, Any]] = []
        for step in range(1, cfg.warmup + cfg.steps + 1):
            status(f"step {step}/{cfg.warmup + cfg.steps}" + (" (warm-up)" if step <= cfg.warmup else ""))
            batch = draw_batch(split, diffusion, cfg.seed, step, cfg.batch_size, config.class_dropout_prob).to(device)
            subnets = sandwich_subnets(space, config, cfg.seed, step, cfg.sandwich)
            measured, alone = _timed_step(model, diffusion, batch, subnets, cfg, dtype)
            if step > cfg.warmup:
                step_row, role_rows = _step_rows(step, subnets, config, cfg, measured, alone)
                steps.append(step_row)
                roles += role_rows
        model.zero_grad(set_to_none=True)
    per_step = pd.DataFrame(steps)
    per_role = pd.DataFrame(roles)
    table = _parts_table(per_step, per_role)
    summary = {
        "overhead_median": float(per_step["overhead"].median()),
        "overhead_mean": float(per_step["overhead"].mean()),
        "sandwich_ms_median": float(per_step["sandwich_ms"].median()),
        "ideal_ms_median": float(per_step["ideal_ms"].median()),
        "model": config.name,
        "data": f"{split.name} {split.image_size}x{split.image_size}x{split.in_channels}",
        "subnets_per_step": 2 + cfg.sandwich,
        "threads": run.threads,
        "device": device.type,
        "dtype": "bfloat16 autocast" if dtype is not None else "float32",
        "definition": "ideal = (sum of subnet FLOPs / largest FLOPs) x largest subnet's fwd+bwd time; "
                      "overhead = sandwich step time / ideal",
    }
    notes = ["random weights; no optimiser step (timing only)"]
    per_role = per_role.drop(columns=["role"])
    return BenchResult(f"train-{device.type}", table, summary, asdict(cfg), command_line("train", cfg), run.machine,
                       extra={"steps": per_step, "subnets": per_role}, notes=notes)
