"""`dynasearch bench latency`: do sliced subnets run as much faster as their FLOPs say?

Every model is a standalone sliced network (:func:`dynasearch.slicing.slice_subnet`), the full model included, so
all run the same code. Each is timed with :func:`dynasearch.latency.measure_latency` (median of repeated timed
forward passes after warm-up; bf16 autocast on CUDA), in one process, `rounds` times in turn (round-robin, so
drifting load hits every model alike); a model's latency is the median of its per-round medians. Latency does
not depend on the weights, so without --supernet the models have random weights.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..checkpoint.native import load_checkpoint
from ..checks import SUBNET_BYTES, check_memory
from ..cost.flops import closed_form_flops, closed_form_params
from ..cost.latency import measure_latency
from ..device import resolve_device
from ..errors import DynasearchError
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..slicing import slice_subnet
from ..space import load_space
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = ["LatencyBenchConfig", "bench_latency", "latency_models", "mixed_at_ratio", "uniform_at_ratio"]

TARGET_RANGE = (0.3, 0.7)
TOLERANCE = 0.10


@dataclass(frozen=True)
class LatencyBenchConfig(BenchConfig):
    """Which model, which subnets, how to time them."""

    model: str = "DiT-B/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    batch: int = 8
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 3
    rounds: int = 3
    ratios: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    supernet: Path | None = None
    search_results: Path | None = None
    threads: int | None = None
    seed: int = 0
    mixed: int = 0  # per ratio: random per-block subnets of `mixed_space` (irregular, like searched ones)
    mixed_space: str = "blockwise"

    def __post_init__(self) -> None:
        if isinstance(self.mixed, bool) or not isinstance(self.mixed, int) or self.mixed < 0:
            raise BenchError(f"--mixed must be 0 or more, got {self.mixed!r}")
        self.check_positive("input_size", "in_channels", "num_classes", "batch", "repeats", "rounds", "threads")
        self.check_non_negative("warmup")
        if not self.ratios:
            raise BenchError("--ratios must name at least one FLOPs ratio")
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise BenchError(f"--ratios must be numbers in (0, 1], got {r!r}")
        self.check_device()
        self.check_seed()
        check_memory(self.mixed * len(self.ratios) * SUBNET_BYTES, f"--mixed {self.mixed} (subnets per ratio)",
                     BenchError)
        if self.supernet is None:
            self.check_registry_model(self.model, self.batch)


def uniform_at_ratio(config: DiTConfig, ratio: float) -> Subnet:
    """The width-only uniform subnet nearest `ratio` of the full model's closed-form FLOPs: the same heads and MLP
    groups in every block, all tokens, and heads and MLP groups at most one step apart (plain uniform slimming)."""
    full = closed_form_flops(config)
    h, g = config.num_heads, config.mlp_groups
    best: tuple[float, float, Subnet] | None = None
    for a in range(1, h + 1):
        for m in range(1, g + 1):
            if abs(a / h - m / g) > max(1 / h, 1 / g) + 1e-9:
                continue
            subnet = Subnet.uniform(config, a / h, m / g, 1.0)
            key = (abs(closed_form_flops(config, subnet) / full - ratio), abs(a / h - m / g))
            if best is None or key < best[:2]:
                best = (*key, subnet)
    assert best is not None
    return best[2]


def mixed_at_ratio(
    config: DiTConfig, ratio: float, rng: random.Random, space: str = "blockwise", tolerance: float = 0.02,
    tries: int = 2000,
) -> Subnet | None:
    """A random subnet of `space` (per-group heads, MLP width and token ratio, as a search returns them) whose
    closed-form FLOPs are within `tolerance` (relative) of `ratio` of the full model's; None if `tries` steps miss.

    A random draw, then a random walk: each step re-draws one group's choice in one dimension among the values
    that move the FLOPs towards the target, so the result stays irregular but lands on the ratio.
    """
    full, chosen = closed_form_flops(config), load_space(space)
    rates = [list(v) for v in chosen.sample_rates(config, rng)]
    choices = (chosen.attn_rate, chosen.mlp_rate, chosen.token_ratio)
    for _ in range(tries):
        subnet = chosen.subnet(config, *rates)
        current = closed_form_flops(config, subnet) / full
        if abs(current - ratio) <= tolerance * ratio:
            return subnet
        dim, group = rng.randrange(3), rng.randrange(len(rates[0]))
        value = rates[dim][group]
        moves = [v for v in choices[dim] if (v < value if current > ratio else v > value)]
        if moves:
            rates[dim][group] = rng.choice(moves)
    return None


def _searched(search_results: Path, config: DiTConfig) -> list[tuple[str, Subnet]]:
    """The subnets a search exported (RESULTS/subnets/NAME/subnet.json), checked against the supernet."""
    root = search_results / "subnets"
    if not root.is_dir():
        raise BenchError(f"search results '{search_results}' have no subnets/ directory (run 'dynasearch search' "
                         "first)")
    out = []
    for d in sorted(root.iterdir()):
        if (d / "subnet.json").is_file():
            subnet = Subnet.load(d / "subnet.json")
            try:
                subnet.validate(config)
            except DynasearchError as exc:
                raise BenchError(f"'{d / 'subnet.json'}' does not fit the supernet: {exc}") from None
            out.append((f"searched-{d.name}", subnet))
    if not out:
        raise BenchError(f"search results '{search_results}' hold no exported subnet (subnets/*/subnet.json)")
    return out


def _supernet(cfg: LatencyBenchConfig, notes: list[str]) -> DiT:
    path = cfg.supernet
    if path is None and cfg.search_results is not None:
        best = cfg.search_results / "best.json"
        try:
            path = Path(json.loads(best.read_text())["settings"]["supernet"])
        except (OSError, ValueError, KeyError, TypeError):
            raise BenchError(f"give --supernet: '{best}' does not name the searched supernet") from None
    if path is not None:
        model = load_checkpoint(path)
        if model.config.is_sliced:
            raise BenchError(f"'{path}' is a sliced model; --supernet needs a supernet (a training run directory)")
        notes.append(f"weights of '{path}' ({model.config.name} at {model.config.input_size}x{model.config.input_size}"
                     f"x{model.config.in_channels}); --model and the data sizes are ignored")
        return model
    torch.manual_seed(cfg.seed)
    config = get_config(cfg.model, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
    with torch.no_grad():
        model = DiT(config)
    notes.append("random weights: latency does not depend on the weight values")
    return model


def latency_models(
    cfg: LatencyBenchConfig, supernet: DiT, notes: list[str] | None = None
) -> list[tuple[str, str, Subnet]]:
    """(name, kind, subnet): the full model, the uniform subnets at the requested ratios, the searched ones; each
    distinct subnet once (a repeat is left out, with a note)."""
    config = supernet.config
    candidates = [("full", "full", Subnet.full(config))]
    candidates += [(f"uniform-{r:.2f}", "uniform", uniform_at_ratio(config, r)) for r in cfg.ratios]
    rng = random.Random(cfg.seed)
    for r in cfg.ratios:
        for i in range(cfg.mixed):
            subnet = mixed_at_ratio(config, r, rng, cfg.mixed_space)
            if subnet is None:
                if notes is not None:
                    notes.append(f"no random {cfg.mixed_space} subnet within 2% of FLOPs ratio {r}: none timed there")
                break
            candidates.append((f"mixed-{r:.2f}" + (f"-{i + 1}" if cfg.mixed > 1 else ""), "mixed", subnet))
    if cfg.search_results is not None:
        candidates += [(name, "searched", s) for name, s in _searched(cfg.search_results, config)]
    entries: list[tuple[str, str, Subnet]] = []
    first: dict[Subnet, str] = {}
    for name, kind, subnet in candidates:
        if subnet in first:
            if notes is not None:
                notes.append(f"{name} is the same subnet as {first[subnet]}: timed once")
            continue
        first[subnet] = name
        entries.append((name, kind, subnet))
    return entries


def _time_models(models: list[DiT], cfg: LatencyBenchConfig, dtype: torch.dtype | None) -> list[list[float]]:
    """Each model's median latency in each of `cfg.rounds` round-robin passes over all models (seconds)."""
    per_round: list[list[float]] = [[] for _ in models]
    for _ in range(cfg.rounds):
        for i, model in enumerate(models):
            per_round[i].append(measure_latency(model, batch=cfg.batch, warmup=cfg.warmup, repeats=cfg.repeats,
                                                dtype=dtype))
    return per_round


def _latency_row(
    name: str, kind: str, subnet: Subnet, config: DiTConfig, rounds: list[float], full_latency: float
) -> dict[str, Any]:
    """FLOPs, parameters, latency (median of the rounds, and their spread) and the ratios of one model."""
    flops = closed_form_flops(config, subnet)
    flops_ratio = flops / closed_form_flops(config)
    latency = statistics.median(rounds)
    latency_ratio = latency / full_latency
    return {
        "name": name,
        "kind": kind,
        "subnet": subnet.describe(config),
        "gflops": flops / 1e9,
        "params_m": closed_form_params(config, subnet) / 1e6,
        "flops_ratio": flops_ratio,
        "latency_ms": latency * 1e3,
        "latency_ms_spread": (max(rounds) - min(rounds)) * 1e3,
        "latency_ratio": latency_ratio,
        "speedup": 1.0 / latency_ratio,
        "quotient": flops_ratio / latency_ratio,
        "in_target_range": TARGET_RANGE[0] <= flops_ratio <= TARGET_RANGE[1],
        "within_10pct": abs(latency_ratio - flops_ratio) <= TOLERANCE * flops_ratio,
    }


def bench_latency(cfg: LatencyBenchConfig) -> BenchResult:
    """Time the full model and its sliced subnets; FLOPs ratio, latency ratio and their quotient per subnet."""
    device = resolve_device(cfg.device)
    notes: list[str] = []
    supernet = _supernet(cfg, notes).eval()
    config = supernet.config
    config.check_batch(cfg.batch, "--batch")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    entries = latency_models(cfg, supernet, notes)
    with bench_run(device, cfg.threads) as run:
        models = [slice_subnet(supernet, s).to(device).eval() for _, _, s in entries]
        del supernet
        per_round = _time_models(models, cfg, dtype)
    full_latency = statistics.median(per_round[0])
    table = pd.DataFrame([_latency_row(name, kind, subnet, config, rounds, full_latency)
                          for (name, kind, subnet), rounds in zip(entries, per_round, strict=True)])
    in_range = table[table["in_target_range"]]
    summary = {
        "model": config.name,
        "batch": cfg.batch,
        "device": device.type,
        "dtype": "bfloat16 autocast" if dtype is not None else "float32",
        "threads": run.threads,
        "full_latency_ms": full_latency * 1e3,
        "subnets_in_target_range": len(in_range),
        "target": f"latency ratio within {TOLERANCE:.0%} of the FLOPs ratio for FLOPs ratios in "
                  f"[{TARGET_RANGE[0]}, {TARGET_RANGE[1]}] at batch >= 8",
        "target_met": bool(len(in_range) and in_range["within_10pct"].all() and cfg.batch >= 8),
        "quotient_mean_in_range": float(in_range["quotient"].mean()) if len(in_range) else None,
        "quotient_min_in_range": float(in_range["quotient"].min()) if len(in_range) else None,
        "dydit_reference_quotient": 0.84,
    }
    if cfg.batch < 8:
        notes.append(f"batch {cfg.batch} < 8: the target is stated for batch 8 and up")
    settings = {**asdict(cfg), "ratios": list(cfg.ratios)}
    return BenchResult(f"latency-{device.type}", table, summary, settings, command_line("latency", cfg), run.machine,
                       notes=notes)
