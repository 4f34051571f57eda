"""`dynasearch demo`: the whole pipeline on the embedded digits set, from training to the HTML report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checks import check_int, check_new_dir
from .cost.flops import closed_form_flops, format_flops, parse_budget
from .errors import BudgetError, DynasearchError
from .fileio import removed_on_failure, replaced_on_success
from .model.config import get_config
from .model.subnet import Subnet
from .report.build import ReportConfig, build_report
from .search.config import SearchConfig
from .search.run import run_search
from .space import load_space
from .train.config import DEFAULT_MODEL, TrainConfig
from .train.loop import train_supernet

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo writes and how big it is (`quick` is the reduced form the test suite runs)."""

    out: Path = Path("results/demo")
    run_dir: Path = Path("runs/demo")
    quick: bool = False
    flops: str = "0.5x"
    trials: int = 120
    train_steps: int | None = None  # None: train-supernet's default
    eval_num: int = 500
    seed: int = 0
    overwrite: bool = False


@dataclass
class DemoResult:
    """Paths and timings of each stage."""

    out: Path
    run_dir: Path
    report: Path
    seconds: dict[str, float]


def _quick(cfg: DemoConfig) -> dict[str, object]:
    """Stage settings: the full demo, or a seconds-long smoke version."""
    if cfg.quick:
        return {"model": "DiT-N/2", "steps": 6, "batch_size": 16, "trials": 6, "eval_num": 20, "steps_sample": 4,
                "proxy_samples": 64}
    return {"model": None, "steps": cfg.train_steps, "batch_size": None, "trials": cfg.trials,
            "eval_num": cfg.eval_num, "steps_sample": 50, "proxy_samples": 512}


DIGITS_SHAPE = {"input_size": 8, "in_channels": 1, "num_classes": 10}
"""The embedded digits set the demo trains on: 8x8 grey images of 10 classes."""


@dataclass(frozen=True)
class _Stages:
    """The three stages' validated configs, built before anything is written."""

    train: TrainConfig
    search: SearchConfig
    report: ReportConfig


def check_demo(cfg: DemoConfig) -> _Stages:
    """Every check of the demo, before anything is created, moved or deleted: the options (those --quick overrides
    too), the output paths, each stage's config, and that some subnet of the space meets the budget."""
    check_int(cfg.trials, "--trials", 1)
    if isinstance(cfg.eval_num, bool) or not isinstance(cfg.eval_num, int) or cfg.eval_num < 2:
        raise DynasearchError(f"--eval-num must be an integer of at least 2 (a Frechet distance), got {cfg.eval_num!r}")
    for option, path in (("--out", cfg.out), ("--run-dir", cfg.run_dir)):
        check_new_dir(path, f"{option}", DynasearchError)
        if path.exists() and any(path.iterdir()) and not cfg.overwrite:
            raise DynasearchError(f"demo output '{path}' exists and is not empty; pass --overwrite to replace it")
    if cfg.out.resolve() == cfg.run_dir.resolve():
        raise DynasearchError(f"--out and --run-dir must be different directories, got '{cfg.out}' for both")
    settings = _quick(cfg)
    train_kwargs: dict[str, object] = {"out": str(cfg.run_dir), "seed": cfg.seed}
    for key in ("model", "steps", "batch_size"):
        if settings[key] is not None:
            train_kwargs[key] = settings[key]
    train = TrainConfig(**train_kwargs)  # type: ignore[arg-type]
    search = SearchConfig(supernet=cfg.run_dir, flops=cfg.flops, out=cfg.out, trials=int(settings["trials"]),  # type: ignore[call-overload]
                          seed=cfg.seed, proxy_samples=int(settings["proxy_samples"]), export_top=1 if cfg.quick else 3)
    report = ReportConfig(cfg.out, eval_num=int(settings["eval_num"]), steps=int(settings["steps_sample"]),  # type: ignore[call-overload]
                          seed=cfg.seed)
    model = get_config(train.model or DEFAULT_MODEL, **DIGITS_SHAPE)
    space = load_space(train.space)
    full = closed_form_flops(model, Subnet.full(model))
    budget = parse_budget(cfg.flops, full)
    smallest = closed_form_flops(model, space.smallest(model))
    if budget < smallest:
        raise BudgetError(f"FLOPs budget '{cfg.flops}' ({format_flops(budget)}) is below the smallest subnet of space "
                          f"'{space.name}', {format_flops(smallest)} ({smallest / full:.1%} of the full model)")
    return _Stages(train, search, report)


def run_demo(cfg: DemoConfig, stage: Callable[[str], None] | None = None, progress: bool = True) -> DemoResult:
    """Train a supernet on digits, search at the budget, export, evaluate and report; returns the report path.

    Every input is checked first (:func:`check_demo`). With --overwrite the previous outputs are moved aside and
    deleted only once the new run has succeeded: a failed (or interrupted) run puts them back as they were.
    """
    stage = stage or (lambda _m: None)
    stages = check_demo(cfg)
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if cfg.overwrite:
            stack.enter_context(replaced_on_success([cfg.out, cfg.run_dir]))
        for path in (cfg.out, cfg.run_dir):
            stack.enter_context(removed_on_failure(path))
        start = time.perf_counter()
        stage(f"1/3 training a supernet on digits -> {cfg.run_dir}")
        train_supernet(stages.train, progress=progress)
        seconds["train"] = time.perf_counter() - start

        start = time.perf_counter()
        stage(f"2/3 searching at {cfg.flops} FLOPs -> {cfg.out}")
        run_search(stages.search, progress=progress)
        seconds["search"] = time.perf_counter() - start

        start = time.perf_counter()
        stage("3/3 evaluating the exported subnets and the full model, writing the report")
        build_report(stages.report, status=stage)
        seconds["report"] = time.perf_counter() - start
    return DemoResult(cfg.out, cfg.run_dir, cfg.out / "report.html", seconds)
