"""Wall-clock latency of a model's forward pass: median of repeated timed runs after warm-up, in one process."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet

__all__ = ["measure_latency", "measure_schedule_latency"]


@torch.no_grad()
def measure_latency(
    model: DiT,
    batch: int = 8,
    subnet: Subnet | None = None,
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
) -> float:
    """Median seconds of one forward pass of `batch` samples (bf16 autocast when `dtype` is given on CUDA)."""
    cfg = model.config
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    was_training = model.training
    model.eval()
    times = []
    try:
        with autocast:
            for i in range(warmup + repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(x, t, y, subnet=subnet)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


def measure_schedule_latency(
    model: DiT,
    schedule: SubnetSchedule,
    timesteps: list[int],
    batch: int = 8,
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
) -> float:
    """Mean seconds per sampler step of a timestep schedule over `timesteps`: each bucket's subnet timed once on
    `model` (sliced to the schedule's union, or a supernet), weighted by its steps."""
    counts = schedule.buckets.step_counts(timesteps)
    per_bucket = [measure_latency(model, batch=batch, subnet=s, warmup=warmup, repeats=repeats, dtype=dtype) if n
                  else 0.0 for s, n in zip(schedule.subnets, counts, strict=True)]
    return sum(n * v for n, v in zip(counts, per_bucket, strict=True)) / sum(counts)
