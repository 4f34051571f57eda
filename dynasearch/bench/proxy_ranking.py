"""`dynasearch bench ranking`: does the supernet rank subnets the way they rank once trained on their own?

K subnets spread over the space's FLOPs range (or over ``--flops-range``) are scored with the weights they inherit
from the supernet on the search's proxy set (what a search sees), then sliced out
(:func:`dynasearch.slicing.slice_subnet`) and fine-tuned as standalone models with the ordinary diffusion loss (the
largest-subnet path of :func:`dynasearch.train.sandwich_step`, one subnet, no distillation) on the supernet's own
training data, every model seeing the same seeded batches (:func:`dynasearch.train.draw_batch`), with a short
warm-up and a cosine decay so the last iterate is not a noisy snapshot. ``--finetune-seeds R`` repeats the
fine-tune with R batch seeds and averages.

The fine-tuned ("stand-alone") loss is measured on a separate evaluation set (``--eval-samples`` quadruples, other
seed): scoring both sides on the same small set would count the set's own sampling noise, which the inherited and
the barely moved fine-tuned weights share, as agreement. Kendall tau between the two rankings (Yu et al. 2020, "How
to Train Your Super-Net") is reported with its p-value and a bootstrap interval, next to the taus that bound it:
the proxy set against the evaluation set (inherited weights on both: how reliable the proxy's own ranking is), the
fine-tune seeds against each other, and FLOPs alone.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from ..checkpoint.native import load_checkpoint, read_config
from ..cost.flops import closed_form_flops
from ..data import DatasetSplit
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..search.proxy import (
    ProxyEvaluator,
    ProxySet,
    build_proxy_set,
    dataset_from_run_config,
)
from ..space import DEFAULT_SPACE, SearchSpace, load_space
from ..slicing import slice_subnet
from ..train.sandwich import draw_batch, sandwich_step
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = [
    "RankingBenchConfig",
    "bench_ranking",
    "finetune",
    "finetune_lr",
    "kendall_bootstrap",
    "result_name",
    "spread_subnets",
]

TAU_GOAL = 0.7
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_PROXY_SAMPLES = 512  # the search's own proxy size: other sizes get their own file stem
EVAL_SEED_OFFSET = 1_000  # the evaluation set's seed is seed + this: independent of the proxy set


@dataclass(frozen=True)
class RankingBenchConfig(BenchConfig):
    """Which supernet, how many subnets, how long to fine-tune each."""

    supernet: Path = Path("runs/demo")
    k: int = 8
    finetune_steps: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # constant | cosine (linear warm-up over 5% of the steps, then cosine to 0)
    finetune_seeds: int = 1
    space: str | None = None
    proxy_samples: int = DEFAULT_PROXY_SAMPLES
    eval_samples: int = 2048
    bootstrap: int = 2000
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
        self.check_positive("finetune_steps", "batch_size", "lr", "finetune_seeds", "proxy_samples", "eval_samples",
                            "bootstrap", "threads")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BenchError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 3:
            raise BenchError(f"--k must be an integer >= 3 (a rank correlation needs at least 3 subnets), got {self.k!r}")
        self.check_device()


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


def finetune_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """Learning rate of fine-tuning step `step` (1-based): constant, or a 5% linear warm-up then cosine decay to 0."""
    if schedule == "constant":
        return lr
    warmup = max(1, round(0.05 * steps))
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def finetune(
    model: torch.nn.Module,
    split: Any,
    diffusion: GaussianDiffusion,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    schedule: str = "constant",
) -> list[float]:
    """Train a standalone (sliced) model in place for `steps` AdamW steps on seeded batches; returns the losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    full = [("finetune", Subnet.full(model.config))]
    losses = []
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = finetune_lr(lr, schedule, step, steps)
        batch = draw_batch(split, diffusion, seed, step, batch_size, model.config.class_dropout_prob).to(device)
        optimizer.zero_grad(set_to_none=True)
        result = sandwich_step(model, diffusion, batch, full, distill=0.0, autocast_dtype=autocast_dtype)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(result[0].gt)
    model.eval()
    return losses


def kendall_bootstrap(a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile 95% interval of Kendall tau between `a` and `b` over `reps` resamplings of the pairs (items)."""
    rng = np.random.default_rng(seed)
    n, taus = len(a), []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) < 3:
            continue
        tau, _ = kendalltau(a[idx], b[idx])
        if np.isfinite(tau):
            taus.append(tau)
    if not taus:
        return None, None
    lo, hi = np.percentile(taus, [2.5, 97.5])
    return float(lo), float(hi)


def _tau(a: Any, b: Any) -> tuple[float | None, float | None]:
    """Kendall tau and its p-value as floats (None where undefined, e.g. constant input)."""
    tau, p = kendalltau(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    return (float(tau) if np.isfinite(tau) else None, float(p) if np.isfinite(p) else None)


def _space(cfg: RankingBenchConfig, doc: dict[str, Any]) -> SearchSpace:
    """--space, else the space the supernet was trained on (or the default); checked against the training space."""
    trained = SearchSpace.from_dict(doc["space"], source=f"{cfg.supernet}/config.json") if doc.get("space") else None
    space = load_space(cfg.space) if cfg.space is not None else (trained or load_space(DEFAULT_SPACE))
    if trained is not None:
        space.check_trained_on(trained)
    return space


@dataclass
class _Setup:
    """The supernet, its space and training data, and the two scored sets: the search's proxy set and the
    separate evaluation set (another seed)."""

    supernet: DiT
    space: SearchSpace
    split: DatasetSplit
    diffusion: GaussianDiffusion
    proxy: ProxySet
    evalset: ProxySet


def _setup(cfg: RankingBenchConfig, device: torch.device) -> _Setup:
    """Load and check the supernet, its space and data; build the proxy set and the evaluation set."""
    doc = read_config(cfg.supernet)
    supernet = load_checkpoint(cfg.supernet, device=device)
    if supernet.config.is_sliced:
        raise BenchError(f"'{cfg.supernet}' is a sliced model; ranking needs a supernet (a training run directory)")
    space = _space(cfg, doc)
    space.validate_for(supernet.config)
    split = dataset_from_run_config(doc)
    diffusion = diffusion_for(supernet.config)
    proxy = build_proxy_set(split.val_x, split.val_y, diffusion, num=cfg.proxy_samples, seed=cfg.seed)
    evalset = build_proxy_set(split.val_x, split.val_y, diffusion, num=cfg.eval_samples,
                              seed=cfg.seed + EVAL_SEED_OFFSET)
    return _Setup(supernet, space, split, diffusion, proxy, evalset)


def _finetune_runs(
    cfg: RankingBenchConfig, setup: _Setup, i: int, subnet: Subnet, device: torch.device, status: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Slice subnet `i` out and fine-tune it once per fine-tune seed; each run's losses on both sets."""
    runs = []
    for r in range(cfg.finetune_seeds):
        status(f"subnet {i + 1}/{cfg.k}, fine-tune seed {r + 1}/{cfg.finetune_seeds}: {cfg.finetune_steps} steps")
        torch.manual_seed(cfg.seed + r)
        small = slice_subnet(setup.supernet, subnet)
        losses = finetune(small, setup.split, setup.diffusion, cfg.finetune_steps, cfg.batch_size, cfg.lr,
                          cfg.seed + r, device, cfg.lr_schedule)
        runs.append({
            "subnet": i,
            "finetune_seed": cfg.seed + r,
            "finetuned_loss": ProxyEvaluator(small, setup.evalset)(),
            "finetuned_proxy_loss": ProxyEvaluator(small, setup.proxy)(),
            "train_loss_last": float(np.mean(losses[-10:])),
        })
        del small
    return runs


def _subnet_row(
    i: int, subnet: Subnet, config: DiTConfig, inherited: float, inherited_e: float, runs: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    """One subnet's FLOPs, inherited losses and fine-tuned losses (means over its fine-tune runs)."""
    tuned = float(np.mean([x["finetuned_loss"] for x in runs]))
    flops = closed_form_flops(config, subnet)
    return {
        "subnet": i,
        "describe": subnet.describe(config),
        "gflops": flops / 1e9,
        "flops_ratio": flops / closed_form_flops(config),
        "inherited_loss": inherited,
        "finetuned_loss": tuned,
        "inherited_eval_loss": inherited_e,
        "finetuned_proxy_loss": float(np.mean([x["finetuned_proxy_loss"] for x in runs])),
        "finetuned_loss_std": float(np.std([x["finetuned_loss"] for x in runs])),
        "improvement": (inherited_e - tuned) / inherited_e if inherited_e else np.nan,
        "train_loss_last": float(np.mean([x["train_loss_last"] for x in runs])),
        "finetune_s": seconds,
        "subnet_json": subnet.to_json(),
    }


def _ranked(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The subnet rows with each subnet's rank by inherited and by fine-tuned loss."""
    table = pd.DataFrame(rows)
    table.insert(6, "rank_inherited", table["inherited_loss"].rank(method="min").astype(int))
    table.insert(7, "rank_finetuned", table["finetuned_loss"].rank(method="min").astype(int))
    return table


def _seed_taus(runs: pd.DataFrame) -> list[float]:
    """Kendall tau between the fine-tuned losses of every pair of fine-tune seeds (defined ones only)."""
    wide = runs.pivot(index="subnet", columns="finetune_seed", values="finetuned_loss")
    taus = []
    for a in range(wide.shape[1]):
        for b in range(a + 1, wide.shape[1]):
            t_ab, _ = _tau(wide.iloc[:, a], wide.iloc[:, b])
            if t_ab is not None:
                taus.append(t_ab)
    return taus


def _summary(cfg: RankingBenchConfig, table: pd.DataFrame, runs: pd.DataFrame) -> dict[str, Any]:
    """Kendall tau (with p-value and bootstrap interval) and the taus that bound it, the goal and the spreads."""
    tau, p = _tau(table["inherited_loss"], table["finetuned_loss"])
    lo, hi = kendall_bootstrap(table["inherited_loss"].to_numpy(float), table["finetuned_loss"].to_numpy(float),
                               cfg.bootstrap, cfg.seed)
    tau_same, p_same = _tau(table["inherited_eval_loss"], table["finetuned_loss"])
    tau_reliability, _ = _tau(table["inherited_loss"], table["inherited_eval_loss"])
    tau_flops, _ = _tau(-table["gflops"], table["finetuned_loss"])
    seed_taus = _seed_taus(runs) if cfg.finetune_seeds > 1 else []
    return {
        "kendall_tau": tau,
        "p_value": p,
        "tau_ci95": [lo, hi],
        "goal": f"tau >= {TAU_GOAL}",
        "goal_met": bool(tau is not None and tau >= TAU_GOAL),
        "kendall_tau_same_set": tau_same,
        "p_value_same_set": p_same,
        "kendall_tau_proxy_vs_evalset": tau_reliability,
        "kendall_tau_between_finetune_seeds": float(np.mean(seed_taus)) if seed_taus else None,
        "kendall_tau_flops_baseline": tau_flops,
        "flops_ratio_range": [float(table["flops_ratio"].min()), float(table["flops_ratio"].max())],
        "inherited_loss_spread": float(table["inherited_loss"].max() - table["inherited_loss"].min()),
        "mean_improvement": float(table["improvement"].mean()),
    }


_NOTES = [
    "kendall_tau: inherited loss on the proxy set (what the search sees) against the fine-tuned loss on the "
    "separate evaluation set; kendall_tau_same_set: both on the evaluation set (weight sharing alone, "
    "without the proxy set's sampling noise)",
    "kendall_tau_proxy_vs_evalset: inherited weights on the proxy set against the evaluation set; it bounds "
    "what kendall_tau can reach",
    "kendall_tau_flops_baseline ranks by FLOPs alone (more FLOPs = better): over a wide FLOPs range it is "
    "high too; --flops-range LO,HI (e.g. 0.45,0.55) ranks subnets of about one budget, what a search decides",
    "improvement = relative drop of the evaluation-set loss by fine-tuning; near 0 means the fine-tune barely "
    "moved the weights and tau says little",
]


def bench_ranking(cfg: RankingBenchConfig, status: Callable[[str], None] | None = None) -> BenchResult:
    """Inherited vs fine-tuned loss of K subnets spread over the FLOPs range; Kendall tau between them."""
    status = status or (lambda _m: None)
    with bench_run(cfg.device, cfg.threads) as run:
        setup = _setup(cfg, run.device)
        config = setup.supernet.config
        inherited_proxy = ProxyEvaluator(setup.supernet, setup.proxy)
        inherited_eval = ProxyEvaluator(setup.supernet, setup.evalset)
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        for i, subnet in enumerate(spread_subnets(setup.space, config, cfg.k, cfg.seed, flops_range=cfg.flops_range)):
            inherited, inherited_e = inherited_proxy(subnet), inherited_eval(subnet)
            start = time.perf_counter()
            mine = _finetune_runs(cfg, setup, i, subnet, run.device, status)
            runs += mine
            rows.append(_subnet_row(i, subnet, config, inherited, inherited_e, mine, time.perf_counter() - start))
    table, runs_df = _ranked(rows), pd.DataFrame(runs)
    summary = {**_summary(cfg, table, runs_df), "model": config.name, "space": setup.space.name,
               "threads": run.threads}
    settings = {**asdict(cfg), "flops_range": list(cfg.flops_range)}
    return BenchResult(result_name(cfg), table, summary, settings, command_line("ranking", cfg), run.machine,
                       extra={"runs": runs_df}, notes=list(_NOTES))


def result_name(cfg: RankingBenchConfig) -> str:
    """File stem: ranking, plus the FLOPs range and the proxy size where they differ from the defaults."""
    name = "ranking"
    if cfg.flops_range != (0.0, 1.0):
        name += f"-{cfg.flops_range[0]:g}-{cfg.flops_range[1]:g}"
    if cfg.proxy_samples != DEFAULT_PROXY_SAMPLES:
        name += f"-proxy{cfg.proxy_samples}"
    return name
