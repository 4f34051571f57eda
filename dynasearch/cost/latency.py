"""Wall-clock latency of a model's forward pass: median of repeated timed runs after warm-up, in one process."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from ..model.dit import DiT
from ..model.subnet import Subnet

__all__ = ["measure_latency"]


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
