"""`dynasearch demo`: the whole pipeline on the embedded digits set, from training to the HTML report."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cost.flops import parse_budget
from .errors import DynasearchError
from .report.build import ReportConfig, build_report
from .search.config import SearchConfig
from .search.run import run_search
from .train.config import TrainConfig
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


def run_demo(cfg: DemoConfig, stage: Callable[[str], None] | None = None, progress: bool = True) -> DemoResult:
    """Train a supernet on digits, search at the budget, export, evaluate and report; returns the report path."""
    stage = stage or (lambda _m: None)
    settings = _quick(cfg)
    parse_budget(cfg.flops, full_flops=1)  # a malformed budget fails now, not after the training stage
    for path in (cfg.out, cfg.run_dir):
        if path.exists() and any(path.iterdir()) and not cfg.overwrite:
            raise DynasearchError(f"demo output '{path}' exists and is not empty; pass --overwrite to replace it")
    if cfg.overwrite:
        for path in (cfg.out, cfg.run_dir):
            shutil.rmtree(path, ignore_errors=True)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    stage(f"1/3 training a supernet on digits -> {cfg.run_dir}")
    train_kwargs: dict[str, object] = {"out": str(cfg.run_dir), "seed": cfg.seed}
    for key in ("model", "steps", "batch_size"):
        if settings[key] is not None:
            train_kwargs[key] = settings[key]
    train_supernet(TrainConfig(**train_kwargs), progress=progress)  # type: ignore[arg-type]
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    stage(f"2/3 searching at {cfg.flops} FLOPs -> {cfg.out}")
    search = SearchConfig(supernet=cfg.run_dir, flops=cfg.flops, out=cfg.out, trials=int(settings["trials"]), seed=cfg.seed,
                          proxy_samples=int(settings["proxy_samples"]), export_top=1 if cfg.quick else 3)
    run_search(search, progress=progress)
    seconds["search"] = time.perf_counter() - start

    start = time.perf_counter()
    stage("3/3 evaluating the exported subnets and the full model, writing the report")
    build_report(ReportConfig(cfg.out, eval_num=int(settings["eval_num"]), steps=int(settings["steps_sample"]), seed=cfg.seed),
                 status=stage)
    seconds["report"] = time.perf_counter() - start
    return DemoResult(cfg.out, cfg.run_dir, cfg.out / "report.html", seconds)
