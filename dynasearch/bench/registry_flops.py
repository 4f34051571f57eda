"""`dynasearch bench flops`: the registry's GFLOPs counted two ways (fvcore with the attention handler, closed form)
and its parameters (counted on the built model and in closed form).

fvcore traces real tensors, so every model is built for real (under ``torch.no_grad``; DiT-XL takes seconds), one
at a time, and freed before the next.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..cost.flops import closed_form_flops, closed_form_params, count_flops
from ..model.config import DIT_CONFIGS, get_config
from ..model.dit import DiT
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = ["FlopsBenchConfig", "bench_flops"]

_HEAVY = {"aten::scaled_dot_product_attention", "aten::matmul", "aten::bmm", "aten::baddbmm", "aten::addmm",
          "aten::linear", "aten::_convolution", "aten::einsum", "aten::mm"}


@dataclass(frozen=True)
class FlopsBenchConfig(BenchConfig):
    """Which registry models, at which data sizes."""

    models: tuple[str, ...] = tuple(DIT_CONFIGS)
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    batch: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        self.check_positive("input_size", "in_channels", "num_classes", "batch", "threads")
        if not self.models:
            raise BenchError("--models must name at least one registry model")
        unknown = [m for m in self.models if m not in DIT_CONFIGS]
        if unknown:
            raise BenchError(f"--models: unknown model '{unknown[0]}'; choose from: {', '.join(DIT_CONFIGS)}")
        for name in self.models:
            self.check_registry_model(name, self.batch)


def _count(name: str, cfg: FlopsBenchConfig) -> tuple[dict[str, Any], set[str]]:
    """Build one registry model (seeded, no grad) and count it both ways; its row and the ops fvcore skipped."""
    config = get_config(name, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        model = DiT(config).eval()
    built = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        counted = count_flops(model, batch=cfg.batch)
    seconds = time.perf_counter() - start
    routers = sum(p.numel() for n, p in model.named_parameters() if ".token_router." in n)
    params = sum(p.numel() for p in model.parameters())
    closed = closed_form_flops(config, batch=cfg.batch)
    params_closed = closed_form_params(config, routers=False)
    row = {
        "model": name,
        "depth": config.depth,
        "width": config.hidden_size,
        "heads": config.num_heads,
        "patch": config.patch_size,
        "tokens": config.num_tokens,
        "params_m": (params - routers) / 1e6,
        "params_m_closed_form": params_closed / 1e6,
        "params_match": params - routers == params_closed,
        "router_params_m": routers / 1e6,
        "gflops_fvcore": counted.total / 1e9,
        "gflops_closed_form": closed / 1e9,
        "match": counted.total == closed,
        "build_s": built,
        "count_s": seconds,
    }
    return row, set(counted.skipped_ops)


def bench_flops(cfg: FlopsBenchConfig) -> BenchResult:
    """One row per model: GFLOPs by fvcore and by the closed form, parameters counted and in closed form."""
    rows: list[dict[str, Any]] = []
    skipped: set[str] = set()
    with bench_run("cpu", cfg.threads) as run:
        for name in cfg.models:  # one model at a time, freed before the next
            row, ops = _count(name, cfg)
            rows.append(row)
            skipped.update(ops)
    table = pd.DataFrame(rows)
    summary = {
        "models": len(table),
        "all_match": bool(table["match"].all()),
        "params_match": bool(table["params_match"].all()),
        "convention": "one multiply-add = one FLOP (fvcore, DiT), forward pass, parameters without token routers",
        "fvcore_skipped_ops": sorted(skipped),  # element-wise ops: zero by the fvcore / DiT convention
        "data": f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels} latents, {cfg.num_classes} classes, batch "
                f"{cfg.batch}",
    }
    notes = [] if summary["all_match"] else ["fvcore and the closed form disagree on: "
                                             + ", ".join(table.loc[~table["match"], "model"])]
    heavy = sorted(skipped & _HEAVY)
    if heavy:
        notes.append(f"fvcore skipped compute-heavy ops it has no handler for: {', '.join(heavy)}")
    settings = {**asdict(cfg), "models": list(cfg.models)}
    command = command_line("flops", cfg, **({"models": "all"} if cfg.models == tuple(DIT_CONFIGS) else {}))
    return BenchResult("flops", table, summary, settings, command, run.machine, notes=notes)
