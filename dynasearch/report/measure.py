"""What the report measures on the models a search exported (and the full model): FLOPs, parameters, latency,
FD and class accuracy, and a sample grid each; :class:`ReportConfig` says which of these and how much."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..checkpoint.native import load_checkpoint, read_config, read_schedule
from ..checks import check_finite, check_int, check_memory, check_seed
from ..cost.flops import closed_form_params, flops_per_step
from ..cost.latency import measure_latency, measure_schedule_latency
from ..diffusion.factory import diffusion_for
from ..errors import ConfigError, DataError, DynasearchError
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from ..quality import StatusFn, evaluate_quality, load_reference, resolve_data
from ..sampling import SAMPLE_BYTES, cycle_labels, grid_array, sample_images

__all__ = ["FULL_MODEL", "Measurements", "ReportConfig", "exported_models", "measure_models"]

FULL_MODEL = "full model"  # the name of the supernet's row
NUM_TIMESTEPS = 1000  # the diffusion every model is sampled with (diffusion_for): the most steps a sampler takes


@dataclass(frozen=True)
class ReportConfig:
    """What `dynasearch report` does: which extras to measure (samples, metric, latency) and how much."""

    out: Path
    samples: bool = True
    eval_num: int = 500
    steps: int = 50
    cfg_scale: float = 4.0
    seed: int = 0
    latency_batch: int = 8
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        """Check every option before the report writes its first figure (ConfigError naming the option)."""
        if (isinstance(self.eval_num, bool) or not isinstance(self.eval_num, int) or self.eval_num == 1
                or self.eval_num < 0):
            raise ConfigError(f"--eval-num must be 0 (no metric) or at least 2, got {self.eval_num!r}")
        check_int(self.steps, "--steps", 1, NUM_TIMESTEPS, ConfigError)
        check_finite(self.cfg_scale, "--cfg-scale", ConfigError, low=0.0)
        check_seed(self.seed, "--seed", ConfigError)
        check_int(self.latency_batch, "--latency-batch", 1, None, ConfigError)
        check_int(self.latency_repeats, "latency repeats", 1, None, ConfigError)
        check_memory(self.eval_num * SAMPLE_BYTES, f"--eval-num {self.eval_num}", ConfigError)
        check_memory(self.latency_batch * SAMPLE_BYTES, f"--latency-batch {self.latency_batch}", ConfigError)


@dataclass
class Measurements:
    """One row per model measured, the sample grids drawn (title, image) and why a model was left out."""

    models: pd.DataFrame
    grids: list[tuple[str, np.ndarray]]
    notes: list[str]


def exported_models(out: Path, best: dict[str, Any], folder: str) -> list[tuple[str, Path]]:
    """('full model', supernet dir) followed by every exported checkpoint in `out/folder` (subnets or schedules)."""
    entries: list[tuple[str, Path]] = [(FULL_MODEL, Path(best["settings"]["supernet"]))]
    sub = out / folder
    if sub.is_dir():
        entries += [(p.name, p) for p in sorted(sub.iterdir()) if (p / "config.json").is_file()]
    return entries


def _load(name: str, path: Path) -> tuple[DiT, Subnet | SubnetSchedule]:
    """A model and what it runs: the full supernet for the full model, else its subnet or timestep schedule."""
    model = load_checkpoint(path)
    schedule = read_schedule(read_config(path), model.config, path)
    if name == FULL_MODEL:
        model.set_subnet(Subnet.full(model.config))
        schedule = None
    return model, schedule if schedule is not None else model.subnet


def _latency(model: DiT, run: Subnet | SubnetSchedule, cfg: ReportConfig) -> float:
    """Median forward seconds; for a schedule, the mean over a `cfg.steps` DDIM run of its buckets' latencies."""
    if not isinstance(run, SubnetSchedule):
        return measure_latency(model, batch=cfg.latency_batch, repeats=cfg.latency_repeats)
    timesteps = diffusion_for(model.config).timestep_schedule(cfg.steps)
    return measure_schedule_latency(model, run, timesteps, batch=cfg.latency_batch, repeats=cfg.latency_repeats)


def _quality(
    name: str, path: Path, model: DiT, run: Subnet | SubnetSchedule, cfg: ReportConfig, status: StatusFn,
    notes: list[str],
) -> dict[str, Any]:
    """FD and class accuracy on `cfg.eval_num` samples against the data the checkpoint was trained on (nothing with
    eval_num 0; a note saying why where no built-in reference fits)."""
    if cfg.eval_num <= 0:
        return {}
    try:
        how = "--data SPEC to `dynasearch eval`"
        record = resolve_data(read_config(path), model.config, source=f"'{path}'", option=how)
        reference = load_reference(record, model.config, status=status, option=how)
    except DataError as exc:
        notes.append(f"{name}: FD and class accuracy not measured ({exc})")
        return {}
    status(f"scoring {name} on {cfg.eval_num} samples")
    q = evaluate_quality(model, num=cfg.eval_num, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed, subnet=run,
                         reference=reference)
    note = (f"FD and class accuracy against {reference.describe()}, in {q.extractor} features (its accuracy on "
            f"{reference.classifier_val()} val images: {q.classifier_accuracy:.1%})")
    if note not in notes:
        notes.append(note)
    return {"FD": q.fd, "class accuracy": q.class_accuracy}


def _sample_grid(model: DiT, run: Subnet | SubnetSchedule, cfg: ReportConfig) -> np.ndarray:
    """Four samples of each of the first (up to) 10 classes, one class per column, with the report's seed."""
    nrow = min(model.config.num_classes, 10)
    labels = cycle_labels(model.config.num_classes, 4 * nrow)
    images = sample_images(model, labels, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed, subnet=run)
    return grid_array(images, nrow=nrow)


def measure_models(
    cfg: ReportConfig, entries: list[tuple[str, Path]], full_gflops: float, status: StatusFn,
    flops_steps: int | None = None,
) -> Measurements:
    """FLOPs, parameters, latency, FD / class accuracy and a sample grid of every model (schedules switch per step).

    A schedule's FLOPs are its mean per step over a `flops_steps` DDIM run (default: the report's `steps`); the
    latency ratio is against the first entry, the full model.
    """
    notes: list[str] = []
    rows, grids, full_latency = [], [], None
    for name, path in entries:
        try:
            model, run = _load(name, path)
        except DynasearchError as exc:
            notes.append(f"{name}: not measured ({exc})")
            continue
        flops = flops_per_step(model.config, run, flops_steps or cfg.steps)
        row: dict[str, Any] = {
            "model": name,
            "gflops": flops / 1e9,
            "% of full FLOPs": 100 * flops / (full_gflops * 1e9),
            "params (M)": closed_form_params(model.config) / 1e6,
        }
        status(f"timing {name}")
        latency = _latency(model, run, cfg)
        full_latency = latency if name == FULL_MODEL else full_latency
        row["latency (ms)"] = latency * 1e3
        row["latency ratio"] = latency / full_latency if full_latency else None
        row.update(_quality(name, path, model, run, cfg, status, notes))
        if cfg.samples and model.config.in_channels in (1, 3):
            status(f"sampling {name}")
            grids.append((f"{name}\n{row['gflops']:.3g} GFLOPs", _sample_grid(model, run, cfg)))
        rows.append(row)
    return Measurements(pd.DataFrame(rows), grids, notes)
