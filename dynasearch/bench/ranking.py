"""`dynasearch bench ranking`: does the supernet rank subnets the way they rank once trained on their own?

K subnets spread over the space's FLOPs range are scored twice on the search's proxy set: with the weights they
inherit from the supernet, and after slicing them out (:func:`dynasearch.slicing.slice_subnet`) and fine-tuning
each standalone model for N steps with the ordinary diffusion loss (the largest-subnet path of
:func:`dynasearch.train.sandwich_step`, one subnet, no distillation) on the supernet's own training data, every model
seeing the same seeded batches (:func:`dynasearch.train.draw_batch`). Kendall tau between the two rankings
measures how faithfully the supernet ranks (Yu et al. 2020, "How to Train Your Super-Net").
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from ..checkpoint import load_checkpoint, read_config
from ..diffusion import GaussianDiffusion
from ..evaluate import ProxyEvaluator, build_proxy_set, dataset_from_run_config
from ..flops import closed_form_flops
from ..model.config import DiTConfig
from ..searchspace import DEFAULT_SPACE, SearchSpace, load_space
from ..slicing import slice_subnet
from ..space import Subnet
from ..train import draw_batch, sandwich_step
from .common import BenchError, BenchResult, check_positive, command_line, machine_info, resolve_device, torch_threads

__all__ = ["RankingBenchConfig", "bench_ranking", "spread_subnets", "finetune"]

TAU_GOAL = 0.7


@dataclass(frozen=True)
class RankingBenchConfig:
    """Which supernet, how many subnets, how long to fine-tune each."""

    supernet: Path = Path("runs/demo")
    k: int = 8
    finetune_steps: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    space: str | None = None
    proxy_samples: int = 512
    flops_range: tuple[float, float] = (0.0, 1.0)  # FLOPs ratios (of the full model) the subnets are drawn from
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        r = tuple(self.flops_range)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
        if len(r) != 2 or not numbers or not 0.0 <= r[0] < r[1] <= 1.0:
            raise BenchError(f"--flops-range must be two FLOPs ratios LO,HI with 0 <= LO < HI <= 1, "
                             f"got {','.join(str(v) for v in r)}")
        object.__setattr__(self, "flops_range", (float(r[0]), float(r[1])))
        check_positive(finetune_steps=self.finetune_steps, batch_size=self.batch_size, lr=self.lr,
                       proxy_samples=self.proxy_samples, threads=self.threads)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 3:
            raise BenchError(f"--k must be an integer >= 3 (a rank correlation needs at least 3 subnets), got {self.k!r}")
        if self.device not in ("cpu", "cuda"):
            raise BenchError(f"--device must be cpu or cuda, got '{self.device}'")


def spread_subnets(
    space: SearchSpace,
    config: DiTConfig,
    k: int,
    seed: int = 0,
    candidates: int = 512,
    flops_range: tuple[float, float] = (0.0, 1.0),
) -> list[Subnet]:
    """k distinct subnets of `space` whose FLOPs spread evenly over the space's range, or over `flops_range` (ratios
    of the full model's FLOPs, e.g. (0.45, 0.55) for subnets near one budget), cheapest first.

    Candidates are the smallest, the largest and `candidates` seeded random draws, kept where their FLOPs ratio lies
    in `flops_range`; for each of k evenly spaced FLOPs targets the nearest candidate not yet taken is picked.
    """
    rng = random.Random(seed)
    full = closed_form_flops(config)
    pool = {space.smallest(config), space.largest(config)}
    pool.update(space.sample(config, rng) for _ in range(candidates))
    lo, hi = flops_range
    items = sorted(((closed_form_flops(config, s), s.to_json(), s) for s in pool), key=lambda x: x[:2])
    items = [x for x in items if lo <= x[0] / full <= hi]
    if len(items) < k:
        raise BenchError(f"search space '{space.name}' gave only {len(items)} distinct subnets of {config.name} with "
                         f"FLOPs ratios in [{lo}, {hi}]; lower --k or widen --flops-range")
    flops = np.array([f for f, _, _ in items], dtype=float)
    taken: list[int] = []
    for target in np.linspace(flops[0], flops[-1], k):
        order = np.argsort(np.abs(flops - target), kind="stable")
        taken.append(next(int(i) for i in order if int(i) not in taken))
    return [items[i][2] for i in sorted(taken)]


def finetune(
    model: torch.nn.Module,
    split: Any,
    diffusion: GaussianDiffusion,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> list[float]:
    """Train a standalone (sliced) model in place for `steps` AdamW steps on seeded batches; returns the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    full = [("finetune", Subnet.full(model.config))]
    losses = []
    for step in range(1, steps + 1):
        batch = draw_batch(split, diffusion, seed, step, batch_size, model.config.class_dropout_prob).to(device)
        optimizer.zero_grad(set_to_none=True)
        result = sandwich_step(model, diffusion, batch, full, distill=0.0, autocast_dtype=autocast_dtype)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(result[0].gt)
    model.eval()
    return losses


def _space(cfg: RankingBenchConfig, doc: dict[str, Any]) -> SearchSpace:
    trained = SearchSpace.from_dict(doc["space"], source=f"{cfg.supernet}/config.json") if doc.get("space") else None
    space = load_space(cfg.space) if cfg.space is not None else (trained or load_space(DEFAULT_SPACE))
    if trained is not None:
        space.check_trained_on(trained)
    return space


def bench_ranking(cfg: RankingBenchConfig, status: Callable[[str], None] | None = None) -> BenchResult:
    """Inherited vs fine-tuned proxy loss of K subnets spread over the FLOPs range; Kendall tau between them."""
    status = status or (lambda _m: None)
    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads) as threads:
        machine = machine_info(device)
        doc = read_config(cfg.supernet)
        supernet = load_checkpoint(cfg.supernet, device=device)
        if supernet.config.is_sliced:
            raise BenchError(f"'{cfg.supernet}' is a sliced model; ranking needs a supernet (a training run directory)")
        config = supernet.config
        space = _space(cfg, doc)
        space.validate_for(config)
        split = dataset_from_run_config(doc)
        diffusion = GaussianDiffusion(learn_sigma=config.learn_sigma)
        proxy = build_proxy_set(split.val_x, split.val_y, diffusion, num=cfg.proxy_samples, seed=cfg.seed)
        inherited_eval = ProxyEvaluator(supernet, proxy)
        full = closed_form_flops(config)
        rows: list[dict[str, Any]] = []
        for i, subnet in enumerate(spread_subnets(space, config, cfg.k, cfg.seed, flops_range=cfg.flops_range)):
            status(f"subnet {i + 1}/{cfg.k}: fine-tuning {cfg.finetune_steps} steps")
            inherited = inherited_eval(subnet)
            start = time.perf_counter()
            torch.manual_seed(cfg.seed)
            small = slice_subnet(supernet, subnet)
            losses = finetune(small, split, diffusion, cfg.finetune_steps, cfg.batch_size, cfg.lr, cfg.seed, device)
            tuned = ProxyEvaluator(small, proxy)()
            flops = closed_form_flops(config, subnet)
            rows.append({
                "subnet": i,
                "describe": subnet.describe(config),
                "gflops": flops / 1e9,
                "flops_ratio": flops / full,
                "inherited_loss": inherited,
                "finetuned_loss": tuned,
                "improvement": (inherited - tuned) / inherited if inherited else np.nan,
                "train_loss_last": float(np.mean(losses[-10:])),
                "finetune_s": time.perf_counter() - start,
                "subnet_json": subnet.to_json(),
            })
            del small
    table = pd.DataFrame(rows)
    table.insert(6, "rank_inherited", table["inherited_loss"].rank(method="min").astype(int))
    table.insert(7, "rank_finetuned", table["finetuned_loss"].rank(method="min").astype(int))
    tau, p = kendalltau(table["inherited_loss"], table["finetuned_loss"])
    tau_flops, _ = kendalltau(-table["gflops"], table["finetuned_loss"])
    tau, p, tau_flops = (float(v) if np.isfinite(v) else None for v in (tau, p, tau_flops))
    summary = {
        "kendall_tau": tau,
        "p_value": p,
        "goal": f"tau >= {TAU_GOAL}",
        "goal_met": bool(tau is not None and tau >= TAU_GOAL),
        "kendall_tau_flops_baseline": tau_flops,
        "mean_improvement": float(table["improvement"].mean()),
        "model": config.name,
        "space": space.name,
        "threads": threads,
    }
    notes = ["kendall_tau_flops_baseline ranks by FLOPs alone (more FLOPs = better): over a wide FLOPs range it is "
             "high too; --flops-range LO,HI (e.g. 0.45,0.55) ranks subnets of about one budget, what a search decides",
             "improvement = relative drop of the proxy loss by fine-tuning; near 0 means the fine-tune barely "
             "moved the weights and tau says little"]
    settings = {**asdict(cfg), "flops_range": list(cfg.flops_range)}
    return BenchResult("ranking", table, summary, settings, command_line("ranking", cfg), machine, notes=notes)
