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

Every proxy kind of the search (:data:`dynasearch.search.proxy.PROXY_KINDS`: eps, teacher, teacher-norm,
teacher-sample) scores the same subnets with the same inherited weights, and each is ranked against each ground
truth: the fine-tuned loss and, with ``--fd-samples N``, the Frechet distance of N samples of every fine-tuned
model (:func:`dynasearch.quality.evaluate_quality`, in the default extractor's feature space, against the real
images of the supernet's training data; one sampling seed for every model, so that they start from the same noise).
The kinds' taus, intervals and costs are the ``_proxies.csv`` table and the summary's ``proxies``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checkpoint.native import load_checkpoint, read_config
from ..checks import check_memory
from ..cost.flops import closed_form_flops
from ..data import DataRecord, DatasetSplit
from ..diffusion.factory import diffusion_for
from ..diffusion.gaussian import GaussianDiffusion
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..quality import evaluate_quality
from ..sampling import DEFAULT_STEPS, SAMPLE_BYTES
from ..search.proxy import (
    PROXY_KINDS,
    SAMPLE_STEPS,
    ProxyEvaluator,
    ProxySet,
    build_proxy_set,
    dataset_from_run_config,
)
from ..slicing import slice_subnet
from ..space import DEFAULT_SPACE, SearchSpace, load_space
from ..train.sandwich import draw_batch, sandwich_step
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line
from .ranking_stats import (
    kendall_bootstrap,
    loss_summary,
    proxy_column,
    proxy_summary,
    proxy_taus,
)

__all__ = [
    "RankingBenchConfig",
    "bench_ranking",
    "finetune",
    "finetune_lr",
    "kendall_bootstrap",
    "result_name",
    "spread_subnets",
]

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
    fd_samples: int = 0  # samples per fine-tuned model for the FD ground truth (0: no FD)
    fd_steps: int = DEFAULT_STEPS  # DDIM steps of those samples
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
                            "bootstrap", "fd_steps", "threads")
        self.check_non_negative("fd_samples")
        for key in ("proxy_samples", "eval_samples"):  # teacher-sample runs one trajectory per SAMPLE_STEPS of them
            if getattr(self, key) < SAMPLE_STEPS:
                raise BenchError(f"--{key.replace('_', '-')} must be at least {SAMPLE_STEPS} (one {SAMPLE_STEPS}-step "
                                 f"trajectory of the teacher-sample proxy), got {getattr(self, key)}")
        if self.fd_samples == 1:
            raise BenchError("--fd-samples must be 0 (no FD) or at least 2 (a Frechet distance), got 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BenchError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 3:
            raise BenchError("--k must be an integer >= 3 (a rank correlation needs at least 3 subnets), got "
                             f"{self.k!r}")
        self.check_device()
        self.check_seed()
        self.check_proxy_memory("proxy_samples", "eval_samples")
        check_memory(self.fd_samples * SAMPLE_BYTES, f"--fd-samples {self.fd_samples}", BenchError)


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


def _space(cfg: RankingBenchConfig, doc: dict[str, Any]) -> SearchSpace:
    """--space, else the space the supernet was trained on (or the default); checked against the training space."""
    trained = SearchSpace.from_dict(doc["space"], source=f"{cfg.supernet}/config.json") if doc.get("space") else None
    space = load_space(cfg.space) if cfg.space is not None else (trained or load_space(DEFAULT_SPACE))
    if trained is not None:
        space.check_trained_on(trained)
    return space


@dataclass
class _Setup:
    """The supernet, its space and training data, the two scored sets (the search's proxy set and the separate
    evaluation set, another seed), an evaluator per proxy kind on each, and the FD ground truth's extractor."""

    supernet: DiT
    space: SearchSpace
    split: DatasetSplit
    diffusion: GaussianDiffusion
    proxy: ProxySet
    evalset: ProxySet
    evaluators: dict[str, tuple[ProxyEvaluator, ProxyEvaluator]] = field(default_factory=dict)
    setup_s: dict[str, float] = field(default_factory=dict)  # seconds to build each kind's cache on the proxy set
    data: DataRecord | None = None  # the supernet's training data, that the FD ground truth compares with


def _evaluators(setup: _Setup) -> None:
    """One evaluator per proxy kind on the proxy set and on the evaluation set; the teacher's caches are built once
    and shared between the kinds."""
    proxy, evalset = setup.proxy, setup.evalset
    for kind in PROXY_KINDS:
        start = time.perf_counter()
        on_proxy = ProxyEvaluator(setup.supernet, proxy, kind=kind)
        setup.setup_s[kind] = time.perf_counter() - start
        on_eval = ProxyEvaluator(setup.supernet, evalset, kind=kind)
        setup.evaluators[kind] = (on_proxy, on_eval)
        proxy, evalset = on_proxy.proxy, on_eval.proxy


def _setup(cfg: RankingBenchConfig, device: torch.device, status: Callable[[str], None]) -> _Setup:
    """Load and check the supernet, its space and data; build both sets, their evaluators and the FD extractor."""
    doc = read_config(cfg.supernet)
    supernet = load_checkpoint(cfg.supernet, device=device)
    if supernet.config.is_sliced:
        raise BenchError(f"'{cfg.supernet}' is a sliced model; ranking needs a supernet (a training run directory)")
    supernet.config.check_batch(cfg.batch_size, "--batch-size")
    space = _space(cfg, doc)
    space.validate_for(supernet.config)
    split = dataset_from_run_config(doc)
    diffusion = diffusion_for(supernet.config)
    proxy = build_proxy_set(split.val_x, split.val_y, diffusion, num=cfg.proxy_samples, seed=cfg.seed)
    evalset = build_proxy_set(split.val_x, split.val_y, diffusion, num=cfg.eval_samples,
                              seed=cfg.seed + EVAL_SEED_OFFSET)
    if cfg.fd_samples and supernet.config.in_channels not in (1, 3):
        raise BenchError(f"--fd-samples: '{cfg.supernet}' generates latents ({supernet.config.in_channels} channels); "
                         "the built-in FD scores images only (use --fd-samples 0)")
    setup = _Setup(supernet, space, split, diffusion, proxy, evalset, data=DataRecord.from_config(doc))
    status("the teacher's predictions and samples for the proxy kinds")
    _evaluators(setup)
    return setup


def _finetune_runs(
    cfg: RankingBenchConfig, setup: _Setup, i: int, subnet: Subnet, device: torch.device, status: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Slice subnet `i` out and fine-tune it once per fine-tune seed; each run's losses on both sets (and FD)."""
    runs = []
    for r in range(cfg.finetune_seeds):
        status(f"subnet {i + 1}/{cfg.k}, fine-tune seed {r + 1}/{cfg.finetune_seeds}: {cfg.finetune_steps} steps")
        torch.manual_seed(cfg.seed + r)
        small = slice_subnet(setup.supernet, subnet)
        losses = finetune(small, setup.split, setup.diffusion, cfg.finetune_steps, cfg.batch_size, cfg.lr,
                          cfg.seed + r, device, cfg.lr_schedule)
        run = {
            "subnet": i,
            "finetune_seed": cfg.seed + r,
            "finetuned_loss": ProxyEvaluator(small, setup.evalset)(),
            "finetuned_proxy_loss": ProxyEvaluator(small, setup.proxy)(),
            "train_loss_last": float(np.mean(losses[-10:])),
        }
        if cfg.fd_samples:
            status(f"subnet {i + 1}/{cfg.k}, fine-tune seed {r + 1}/{cfg.finetune_seeds}: FD of {cfg.fd_samples} "
                   "samples")
            quality = evaluate_quality(small, num=cfg.fd_samples, steps=cfg.fd_steps, seed=cfg.seed, data=setup.data,
                                       device=device, status=status)
            run["finetuned_fd"] = quality.fd
            run["finetuned_class_accuracy"] = quality.class_accuracy
        runs.append(run)
        del small
    return runs


def _proxy_scores(setup: _Setup, subnet: Subnet) -> tuple[dict[str, float], dict[str, float]]:
    """Every proxy kind's value of `subnet` (inherited weights) on the proxy set and on the evaluation set (columns),
    and the seconds each kind took on the proxy set."""
    values, seconds = {}, {}
    for kind, (on_proxy, on_eval) in setup.evaluators.items():
        start = time.perf_counter()
        values[proxy_column(kind)] = on_proxy(subnet)
        seconds[kind] = time.perf_counter() - start
        values[proxy_column(kind, evalset=True)] = on_eval(subnet)
    return values, seconds


def _subnet_row(
    i: int, subnet: Subnet, config: DiTConfig, scores: dict[str, float], runs: list[dict[str, Any]], seconds: float,
) -> dict[str, Any]:
    """One subnet's FLOPs, inherited losses, fine-tuned losses (means over its fine-tune runs) and proxy values."""
    tuned = float(np.mean([x["finetuned_loss"] for x in runs]))
    inherited_e = scores[proxy_column("eps", evalset=True)]
    flops = closed_form_flops(config, subnet)
    row = {
        "subnet": i,
        "describe": subnet.describe(config),
        "gflops": flops / 1e9,
        "flops_ratio": flops / closed_form_flops(config),
        "inherited_loss": scores[proxy_column("eps")],
        "finetuned_loss": tuned,
        "inherited_eval_loss": inherited_e,
        "finetuned_proxy_loss": float(np.mean([x["finetuned_proxy_loss"] for x in runs])),
        "finetuned_loss_std": float(np.std([x["finetuned_loss"] for x in runs])),
        "improvement": (inherited_e - tuned) / inherited_e if inherited_e else np.nan,
        "train_loss_last": float(np.mean([x["train_loss_last"] for x in runs])),
        "finetune_s": seconds,
        "subnet_json": subnet.to_json(),
    }
    if "finetuned_fd" in runs[0]:
        row["finetuned_fd"] = float(np.mean([x["finetuned_fd"] for x in runs]))
        row["finetuned_fd_std"] = float(np.std([x["finetuned_fd"] for x in runs]))
        accuracy = [x["finetuned_class_accuracy"] for x in runs if x["finetuned_class_accuracy"] is not None]
        row["finetuned_class_accuracy"] = float(np.mean(accuracy)) if accuracy else None
    return {**row, **scores}


def _ranked(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The subnet rows with each subnet's rank by inherited and by fine-tuned loss."""
    table = pd.DataFrame(rows)
    table.insert(6, "rank_inherited", table["inherited_loss"].rank(method="min").astype(int))
    table.insert(7, "rank_finetuned", table["finetuned_loss"].rank(method="min").astype(int))
    return table


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
    "proxies (and the _proxies.csv table): every proxy kind (inherited_loss is proxy_eps) against every ground "
    "truth (finetuned_loss; finetuned_fd with --fd-samples); score_s is the mean seconds to score one subnet, "
    "setup_s the one-off seconds of the teacher's cache on the proxy set",
]


def bench_ranking(cfg: RankingBenchConfig, status: Callable[[str], None] | None = None) -> BenchResult:
    """Inherited proxy values (every kind) vs fine-tuned loss (and FD) of K subnets; Kendall tau between them."""
    status = status or (lambda _m: None)
    with bench_run(cfg.device, cfg.threads) as run:
        setup = _setup(cfg, run.device, status)
        config = setup.supernet.config
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        score_s: dict[str, list[float]] = {kind: [] for kind in PROXY_KINDS}
        for i, subnet in enumerate(spread_subnets(setup.space, config, cfg.k, cfg.seed, flops_range=cfg.flops_range)):
            scores, seconds = _proxy_scores(setup, subnet)
            for kind, sec in seconds.items():
                score_s[kind].append(sec)
            start = time.perf_counter()
            mine = _finetune_runs(cfg, setup, i, subnet, run.device, status)
            runs += mine
            rows.append(_subnet_row(i, subnet, config, scores, mine, time.perf_counter() - start))
    table, runs_df = _ranked(rows), pd.DataFrame(runs)
    costs = {kind: {"setup_s": setup.setup_s[kind], "score_s": float(np.mean(score_s[kind]))} for kind in PROXY_KINDS}
    taus = proxy_taus(table, cfg.bootstrap, cfg.seed, PROXY_KINDS, costs)
    summary = {**loss_summary(table, runs_df, cfg.bootstrap, cfg.seed), **proxy_summary(taus, table, runs_df),
               "model": config.name, "space": setup.space.name, "threads": run.threads}
    settings = {**asdict(cfg), "flops_range": list(cfg.flops_range)}
    return BenchResult(result_name(cfg), table, summary, settings, command_line("ranking", cfg), run.machine,
                       extra={"runs": runs_df, "proxies": taus}, notes=list(_NOTES))


def result_name(cfg: RankingBenchConfig) -> str:
    """File stem: ranking, plus the FLOPs range and the proxy size where they differ from the defaults."""
    name = "ranking"
    if cfg.flops_range != (0.0, 1.0):
        name += f"-{cfg.flops_range[0]:g}-{cfg.flops_range[1]:g}"
    if cfg.proxy_samples != DEFAULT_PROXY_SAMPLES:
        name += f"-proxy{cfg.proxy_samples}"
    return name
