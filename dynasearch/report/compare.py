"""`dynasearch compare`: named checkpoints measured side by side in one run, the same samples settings and several
sampling seeds each: FLOPs per step, parameters, FD and class accuracy against the one data set they were all
trained on, with the seed-to-seed spread a difference has to beat."""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoint.native import load_checkpoint, read_config
from ..checks import check_seed
from ..cost.flops import closed_form_params, flops_per_step
from ..device import machine_info, resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import atomic_write_text
from ..images import check_writable
from ..model.config import DiTConfig
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from ..quality import StatusFn, evaluate_quality, load_reference, resolve_data
from ..quality.reference import Reference
from ..sampling import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    SAMPLERS,
    ProgressFn,
    checkpoint_subnet,
)
from .plots import plot_comparison

__all__ = ["CompareConfig", "CompareEntry", "Comparison", "compare_models", "parse_model_spec", "parse_seeds",
           "write_comparison"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class CompareEntry:
    """One row of the comparison: a display name and a checkpoint directory (supernet, subnet or schedule)."""

    name: str
    path: Path


def parse_model_spec(text: str) -> CompareEntry:
    """'NAME=PATH' (or a bare PATH, named after its folder) -> CompareEntry; a bad name is a ConfigError."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not path:
        raise ConfigError(f"--model {text!r}: expected NAME=PATH (a checkpoint directory)")
    if not _NAME.match(name):
        raise ConfigError(f"--model {text!r}: the name {name!r} must be letters, digits and _ . + - only")
    return CompareEntry(name, Path(path))


@dataclass(frozen=True)
class CompareConfig:
    """Everything `dynasearch compare` needs; validated on construction (ConfigError)."""

    models: tuple[CompareEntry, ...]
    seeds: tuple[int, ...] = (0, 1)
    num: int = 1000
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    sampler: str = "ddim"
    device: str = "cpu"
    data: str | None = None  # the data every model was trained on, overriding their records
    out: Path | None = None
    command: str | None = None  # the command line recorded beside the numbers (default: this process's argv)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("--model: give at least one NAME=PATH")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"--model: the name {dup[0]!r} is given more than once")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        for seed in self.seeds:
            check_seed(seed, "--seeds", ConfigError)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: {list(self.seeds)} repeats a seed")
        if self.num < 2:
            raise ConfigError(f"--num must be at least 2 for a Frechet distance, got {self.num}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); anything else is a ConfigError naming --seeds."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers such as 0,1, got {text!r}") from None


@dataclass
class Comparison:
    """Every (model, seed) measured (`runs`), one row per model with means and spreads (`summary`), and the record
    of how: command, machine, date, sampling settings and the reference data."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Loaded:
    entry: CompareEntry
    doc: dict[str, Any]
    config: DiTConfig
    run: Subnet | SubnetSchedule | None


def _check(entry: CompareEntry) -> _Loaded:
    """Read a model's config and what it runs, without loading its weights (so every input is checked first)."""
    if not entry.path.exists():
        raise CheckpointError(f"--model {entry.name}: checkpoint '{entry.path}' does not exist")
    doc = read_config(entry.path)
    try:
        config = DiTConfig.from_dict(doc["model"])
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--model {entry.name}: checkpoint config '{entry.path}': {exc}") from None
    return _Loaded(entry, doc, config, checkpoint_subnet(entry.path, doc, config, None))


def _one_reference(loaded: list[_Loaded], data: str | None, status: StatusFn | None) -> Reference:
    """The data every model was trained on (one set for all of them, else a DataError naming the two)."""
    first = None
    for item in loaded:
        record = resolve_data(item.doc, item.config, data, source=f"checkpoint '{item.entry.path}'")
        key = (record, item.config.input_size, item.config.in_channels, item.config.num_classes)
        if first is None:
            first = (item, record, key)
        elif key != first[2]:
            raise DataError(
                f"--model {item.entry.name} was trained on other data or another image shape than "
                f"--model {first[0].entry.name}; compare models of one data set"
            )
    assert first is not None
    return load_reference(first[1], first[0].config, status=status)


def _spread(values: pd.Series) -> float:
    return float(values.max() - values.min()) if len(values) > 1 else 0.0


def compare_models(
    config: CompareConfig, progress: ProgressFn | None = None, status: StatusFn | None = None
) -> Comparison:
    """Check every model and the shared reference first, then sample and score each model once per seed."""
    loaded = [_check(entry) for entry in config.models]
    device = resolve_device(config.device)
    reference = _one_reference(loaded, config.data, status)
    if config.out is not None:
        check_writable(config.out / "compare.json")  # before minutes of sampling
    rows: list[dict[str, Any]] = []
    classifier_accuracy = None
    for item in loaded:
        model = load_checkpoint(item.entry.path, device=device)
        run = item.run if item.run is not None else model.subnet
        gflops = flops_per_step(model.config, run, config.steps) / 1e9
        params = closed_form_params(model.config) / 1e6
        for seed in config.seeds:
            if status is not None:
                status(f"{item.entry.name}: {config.num} samples, seed {seed}")
            q = evaluate_quality(
                model, num=config.num, cfg_scale=config.cfg_scale, steps=config.steps, seed=seed, subnet=run,
                sampler=config.sampler, device=device, progress=progress, reference=reference,
            )
            classifier_accuracy = q.classifier_accuracy
            rows.append({"model": item.entry.name, "path": str(item.entry.path), "seed": seed, "gflops": gflops,
                         "params (M)": params, "FD": q.fd, "class accuracy": q.class_accuracy,
                         "sample seconds": q.sample_seconds})
    runs = pd.DataFrame(rows)
    full = max(r["gflops"] for r in rows)
    summary_rows = []
    for name, group in runs.groupby("model", sort=False):
        summary_rows.append({
            "model": name, "gflops": group["gflops"].iloc[0],
            "% of largest FLOPs": 100 * group["gflops"].iloc[0] / full,
            "params (M)": group["params (M)"].iloc[0],
            "FD mean": group["FD"].mean(), "FD spread": _spread(group["FD"]),
            "class accuracy mean": group["class accuracy"].mean(),
            "class accuracy spread": _spread(group["class accuracy"]),
            **{f"FD seed {s}": v for s, v in zip(group["seed"], group["FD"], strict=True)},
        })
    record = {
        "what": "FD and class accuracy of each model, measured side by side in one run",
        "command": config.command or shlex.join(["dynasearch", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(device),
        "settings": {"num": config.num, "steps": config.steps, "cfg_scale": config.cfg_scale,
                     "sampler": config.sampler, "seeds": list(config.seeds)},
        "reference": reference.describe(),
        "classifier_val_accuracy": classifier_accuracy,
        "classifier_val_images": reference.classifier_val(),
    }
    return Comparison(runs, pd.DataFrame(summary_rows), record)


def write_comparison(result: Comparison, out: Path) -> list[Path]:
    """compare.csv (one row per model and seed), compare-summary.csv, compare.json (the record and both tables) and
    compare.png (FD against FLOPs)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.csv", out / "compare-summary.csv", out / "compare.json", out / "compare.png"]
    atomic_write_text(paths[0], result.runs.to_csv(index=False))
    atomic_write_text(paths[1], result.summary.to_csv(index=False))
    doc = {**result.record, "summary": result.summary.to_dict(orient="records"),
           "runs": result.runs.to_dict(orient="records")}
    atomic_write_text(paths[2], json.dumps(doc, indent=2, default=float) + "\n")
    settings = result.record["settings"]
    title = (f"{result.record['reference']}: {settings['num']} samples x seeds {settings['seeds']}, "
             f"{settings['sampler']} {settings['steps']} steps, cfg {settings['cfg_scale']:g}")
    plot_comparison(result.summary, result.runs, paths[3], title)
    return paths
