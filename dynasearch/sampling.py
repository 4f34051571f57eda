"""Sampling: class-conditional images (or latents) from a supernet, one of its subnets or a sliced model.

`sample_images` is the library call (deterministic under a seed): it checks its arguments, then runs the one
sampling loop of `diffusion.samplers` batch after batch, switching subnets per denoising step for a timestep
schedule (`run_schedule`). `run_sample` is what `dynasearch sample` runs; the files it writes (PNG grids, `.npz`
latents, VAE-decoded grids) come from `images`, whose names are importable from here too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint.native import load_checkpoint, read_config, read_schedule
from .checks import check_memory, check_seed
from .device import resolve_device
from .diffusion.factory import diffusion_for
from .diffusion.gaussian import GaussianDiffusion, ModelFn
from .diffusion.samplers import SAMPLERS, check_sampler, make_sampler, sample
from .errors import CheckpointError, ConfigError, DynasearchError
from .images import (
    check_writable,
    decode_latents,
    grid_array,
    load_vae,
    save_grid,
    save_latents,
)
from .model.config import DiTConfig
from .model.dit import DiT
from .model.schedule import SubnetSchedule, load_subnet_or_schedule
from .model.subnet import Subnet

__all__ = [
    "DEFAULT_CFG_SCALE",
    "DEFAULT_STEPS",
    "LATENT_CHANNELS",
    "SAMPLERS",
    "SAMPLE_BYTES",
    "ProgressFn",
    "SampleConfig",
    "SampleResult",
    "check_sampling_args",
    "checkpoint_subnet",
    "cycle_labels",
    "decode_latents",
    "diffusion_for",
    "grid_array",
    "load_subnet_file",
    "load_vae",
    "parse_labels",
    "repeat_labels",
    "resolve_device",
    "run_sample",
    "run_schedule",
    "sample_images",
    "save_grid",
    "save_latents",
]

DEFAULT_CFG_SCALE = 4.0
DEFAULT_STEPS = 50
LATENT_CHANNELS = 4
"""Models with this many input channels are latent-space models (SD VAE latents): not clipped, saved as .npz."""

SAMPLE_BYTES = 4 * 8 * 8
"""A lower bound of the bytes one sample holds (float32 at the smallest input, 8x8x1): a sample count whose images
alone cannot fit is refused before the checkpoint is loaded."""
MAX_LABELS = 10**7
"""The most labels a --labels text may expand to (a range like 0-99999999999 is refused before it is built)."""

ProgressFn = Callable[[int, int], None]
"""progress(done, total): sampling steps done so far over every batch."""


# ---------------------------------------------------------------------------------------------------------- labels
def cycle_labels(num_classes: int, num: int) -> list[int]:
    """`num` labels cycling over the classes: 0, 1, ..., C-1, 0, 1, ..."""
    if num < 1:
        raise ConfigError(f"number of samples must be at least 1, got {num}")
    return [i % num_classes for i in range(num)]


def repeat_labels(classes: Sequence[int], per_label: int) -> list[int]:
    """Each class `per_label` times in a row: a grid with `per_label` columns has one row per class."""
    if per_label < 1:
        raise ConfigError(f"samples per label must be at least 1, got {per_label}")
    return [int(c) for c in classes for _ in range(per_label)]


def parse_labels(text: str) -> tuple[int, ...]:
    """Parse '0,1,2' or ranges like '0-9' (or a mix, '0,3-5') into class ids; anything else is a ConfigError."""
    out: list[int] = []
    tokens = [tok.strip() for tok in str(text).split(",")]
    if not any(tokens):
        raise ConfigError("--labels is empty; give class ids like 0,1,2 or a range like 0-9")
    for tok in tokens:
        single = re.fullmatch(r"\d+", tok)
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", tok)
        if single:
            out.append(int(tok))
        elif span and int(span.group(1)) <= int(span.group(2)):
            if len(out) + int(span.group(2)) - int(span.group(1)) + 1 > MAX_LABELS:
                raise ConfigError(f"--labels: {tok!r} names more than {MAX_LABELS} classes; give class ids of the "
                                  "model")
            out.extend(range(int(span.group(1)), int(span.group(2)) + 1))
        else:
            raise ConfigError(
                f"--labels: cannot parse {tok!r} in {text!r}; give class ids like 0,1,2 or a range like 0-9"
            )
    return tuple(out)


def _check_labels(labels: Sequence[int], num_classes: int) -> None:
    """Raise ConfigError unless every label is a class id of the model."""
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
            raise ConfigError(f"label {label!r} is outside the model's classes [0, {num_classes - 1}]")


def _label_list(config: DiTConfig, labels: Sequence[int] | None, num: int | None) -> list[int]:
    """The per-sample labels `sample_images` runs: `labels` as given, else `num` cycling over the classes."""
    if labels is None:
        if num is None:
            raise ConfigError("give labels or a number of samples")
        label_list = cycle_labels(config.num_classes, num)
    else:
        label_list = [int(v) for v in labels]
        if not label_list:
            raise ConfigError("labels is empty")
        if num is not None and num != len(label_list):
            raise ConfigError(f"num {num} does not match the {len(label_list)} labels given")
    _check_labels(label_list, config.num_classes)
    return label_list


def _check_sampling_args(
    config: DiTConfig, cfg_scale: float, steps: int, sampler: str, diffusion: GaussianDiffusion
) -> None:
    """Raise ConfigError for a sampler, step count or guidance scale this model and diffusion cannot run."""
    check_sampler(sampler)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= diffusion.num_timesteps:
        raise ConfigError(f"steps must be an integer in [1, {diffusion.num_timesteps}], got {steps!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
    if cfg_scale != 1.0 and config.class_dropout_prob <= 0:
        raise ConfigError(
            f"model '{config.name}' was built without label dropout, so it has no null class for "
            f"classifier-free guidance; use cfg_scale 1 (got {cfg_scale})"
        )


check_sampling_args = _check_sampling_args  # the public name (`dynasearch.sample_npz` and quality checks use it)


def _check_subnet(config: DiTConfig, subnet: Subnet | SubnetSchedule | None, diffusion: GaussianDiffusion) -> None:
    """Raise unless `subnet` fits the model and a schedule's timestep buckets cover the diffusion's timesteps."""
    if subnet is not None:
        subnet.validate(config)
    if isinstance(subnet, SubnetSchedule) and subnet.buckets.num_timesteps != diffusion.num_timesteps:
        raise ConfigError(
            f"the schedule's timestep buckets end at {subnet.buckets.num_timesteps} but the diffusion has "
            f"{diffusion.num_timesteps} timesteps"
        )


def _batches(labels: list[int], batch_size: int | None) -> list[list[int]]:
    """The labels in batches of `batch_size` (all in one batch for None); ConfigError below 1."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    bs = len(labels) if batch_size is None else batch_size
    return [labels[i : i + bs] for i in range(0, len(labels), bs)]


def _model_device(model: DiT, device: str | torch.device | None) -> torch.device:
    """Where the model is; ConfigError if `device` was requested and it is elsewhere."""
    dev = next(model.parameters()).device
    if device is not None:
        want = resolve_device(device)
        if want.type != dev.type or (want.index is not None and want.index != dev.index):
            raise ConfigError(f"the model is on {dev} but device {want} was requested; move it with model.to(...)")
    return dev


def _model_fn(model: DiT, subnet: Subnet | SubnetSchedule | None) -> ModelFn:
    """The sampling loop's model call: the subnet, or for a schedule the subnet of each timestep's bucket."""
    if isinstance(subnet, SubnetSchedule):
        return lambda x, t, y: run_schedule(model, subnet, x, t, y)
    return lambda x, t, y: model(x, t, y, subnet=subnet, label_dropout=False)


def _batch_progress(progress: ProgressFn | None, offset: int, total: int) -> Callable[[int, int], None] | None:
    """The loop's progress(k, n) for one batch, reported as progress(steps done over every batch, total)."""
    if progress is None:
        return None
    return lambda k, n: progress(offset + k + 1, total)


@torch.no_grad()
def sample_images(
    model: DiT,
    labels: Sequence[int] | None = None,
    num: int | None = None,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    steps: int = DEFAULT_STEPS,
    sampler: str = "ddim",
    seed: int = 0,
    subnet: Subnet | SubnetSchedule | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    batch_size: int | None = None,
    diffusion: GaussianDiffusion | None = None,
) -> Tensor:
    """Class-conditional samples (B, C, H, W) on the CPU: images in [-1, 1], or latents for 4-channel models.

    `labels` gives one class per sample; without it, `num` samples cycle over the classes (0, 1, ..., C-1, 0, ...).
    Classifier-free guidance uses the null class `num_classes` (skipped when `cfg_scale == 1`). `subnet` runs that
    subnet of a supernet through `model.forward(..., subnet=)`; sliced models run their own default subnet.
    A :class:`SubnetSchedule` switches subnets per denoising step: timestep t runs its bucket's subnet.
    The model runs where it is (`device`, if given, must match it).
    The result is a function of (model, labels, cfg_scale, steps, sampler, seed, batch_size): initial noise and DDPM
    noise come from one CPU `torch.Generator(seed)`, drawn batch after batch, so any device gives the same x_T.
    """
    config = model.config
    label_list = _label_list(config, labels, num)
    diffusion = diffusion if diffusion is not None else diffusion_for(config)
    _check_sampling_args(config, float(cfg_scale), steps, sampler, diffusion)
    _check_subnet(config, subnet, diffusion)
    batches = _batches(label_list, batch_size)
    dev = _model_device(model, device)
    latent = config.in_channels == LATENT_CHANNELS
    plan = make_sampler(diffusion, sampler, steps, clip_denoised=not latent)
    model_fn = _model_fn(model, subnet)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for b, batch in enumerate(batches):
            shape = (len(batch), config.in_channels, config.input_size, config.input_size)
            x = sample(
                plan, model_fn, shape, torch.tensor(batch, dtype=torch.long), cfg_scale=float(cfg_scale),
                generator=generator, device=dev, progress=_batch_progress(progress, b * steps, len(batches) * steps),
                null_class=config.num_classes,
            )  # (b, C, H, W)
            outputs.append(x.float().cpu())
    finally:
        model.train(was_training)
    out = torch.cat(outputs, dim=0)  # (B, C, H, W)
    return out if latent else out.clamp(-1.0, 1.0)


def run_schedule(model: DiT, schedule: SubnetSchedule, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """One forward pass where every sample runs the subnet of its timestep's bucket (one call per bucket present)."""
    bucket = schedule.buckets.bucket_index(t)  # (B,)
    present = bucket.unique().tolist()
    if len(present) == 1:  # the sampler's case: one timestep per step
        return model(x, t, y, subnet=schedule.subnets[present[0]], label_dropout=False)  # (B, C_out, H, W)
    out: Tensor | None = None
    for k in present:
        index = (bucket == k).nonzero().flatten()  # (b,)
        part = model(x[index], t[index], y[index], subnet=schedule.subnets[k], label_dropout=False)  # (b, C_out, H, W)
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))  # (B, C_out, H, W)
        out[index] = part
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class SampleConfig:
    """Everything `dynasearch sample` needs; validated on construction (ConfigError)."""

    checkpoint: Path
    subnet_file: Path | None = None
    labels: tuple[int, ...] | None = None
    num: int | None = None
    per_label: int = 8
    cfg_scale: float = DEFAULT_CFG_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str = "ddim"
    seed: int = 0
    out: Path = Path("samples.png")
    device: str = "auto"
    vae: Path | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.labels is not None and self.num is not None:
            raise ConfigError("give either --labels or --num, not both")
        if self.labels is not None and not self.labels:
            raise ConfigError("--labels is empty")
        if self.num is not None and self.num < 1:
            raise ConfigError(f"--num must be at least 1, got {self.num}")
        if self.per_label < 1:
            raise ConfigError(f"--per-label must be at least 1, got {self.per_label}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        check_sampler(self.sampler)
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if Path(self.out).suffix.lower() != ".png":
            raise ConfigError(f"--out must name a .png file, got '{self.out}'")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        check_seed(self.seed, "--seed", ConfigError)
        count = self.num if self.num is not None else len(self.labels or range(10)) * self.per_label
        what = f"--num {self.num}" if self.num is not None else f"--per-label {self.per_label}"
        check_memory(count * SAMPLE_BYTES, f"{what} ({count} samples)", ConfigError)

    def sample_labels(self, num_classes: int) -> tuple[list[int], int]:
        """Per-sample labels and images per grid row: one row per class for labels, classes across for --num."""
        if self.num is not None:  # one column per class when the classes fit across, else a square-ish grid
            cols = min(self.num, num_classes) if num_classes <= 16 else math.ceil(math.sqrt(self.num))
            return cycle_labels(num_classes, self.num), cols
        classes = list(self.labels) if self.labels is not None else list(range(min(num_classes, 10)))
        _check_labels(classes, num_classes)
        return repeat_labels(classes, self.per_label), self.per_label

    def to_dict(self) -> dict[str, Any]:
        """JSON form (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


@dataclass
class SampleResult:
    """What `run_sample` produced: the samples (images, or latents for latent models) and the files written."""

    samples: Tensor
    labels: list[int]
    latent: bool
    written: list[Path] = field(default_factory=list)
    decoded: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON summary."""
        return {
            "num": len(self.labels),
            "shape": list(self.samples.shape),
            "latent": self.latent,
            "labels": self.labels,
            "written": [str(p) for p in self.written],
        }


def load_subnet_file(path: str | Path, config: DiTConfig) -> Subnet | SubnetSchedule:
    """A subnet or timestep-schedule JSON file, checked against `config` (SubnetError naming the file otherwise)."""
    subnet = load_subnet_or_schedule(path)
    try:
        subnet.validate(config)
    except DynasearchError as exc:
        raise type(exc)(f"subnet file '{path}' does not fit model '{config.name}': {exc}") from None
    return subnet


def checkpoint_subnet(
    checkpoint: Path, doc: dict[str, Any], config: DiTConfig, subnet_file: Path | None
) -> Subnet | SubnetSchedule | None:
    """What to run: the `--subnet` file if given, else the checkpoint's own timestep schedule (None: its subnet)."""
    if subnet_file is not None:
        return load_subnet_file(subnet_file, config)
    return read_schedule(doc, config, checkpoint)


def run_sample(config: SampleConfig, progress: ProgressFn | None = None) -> SampleResult:
    """Sample from a checkpoint and write the grid (and latents). Every input is checked before anything is written."""
    doc = read_config(config.checkpoint)
    try:
        model_config = DiTConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{config.checkpoint}': {exc}") from None
    labels, nrow = config.sample_labels(model_config.num_classes)
    diffusion = diffusion_for(model_config)
    _check_sampling_args(model_config, config.cfg_scale, config.steps, config.sampler, diffusion)
    latent = model_config.in_channels == LATENT_CHANNELS
    check_writable(Path(config.out).with_suffix(".npz") if latent else Path(config.out))  # before minutes of sampling
    if config.vae is not None and not latent:
        raise ConfigError(
            f"--vae decodes latents of 4-channel models; this model has {model_config.in_channels} channel(s)"
        )
    if not latent and model_config.in_channels not in (1, 3):
        raise ConfigError(f"cannot draw {model_config.in_channels}-channel images as a grid (1 or 3 channels)")
    device = resolve_device(config.device)
    subnet = checkpoint_subnet(config.checkpoint, doc, model_config, config.subnet_file)
    vae = load_vae(config.vae, device) if config.vae is not None else None
    model = load_checkpoint(config.checkpoint, device=device)
    samples = sample_images(
        model, labels, cfg_scale=config.cfg_scale, steps=config.steps, sampler=config.sampler, seed=config.seed,
        subnet=subnet, device=device, progress=progress, batch_size=config.batch_size, diffusion=diffusion,
    )
    result = SampleResult(samples=samples, labels=labels, latent=latent)
    out = Path(config.out)
    if latent:
        result.written.append(save_latents(samples, labels, out.with_suffix(".npz"), model_config.num_classes))
        if vae is not None:
            result.decoded = decode_latents(vae, samples)
            result.written.append(save_grid(result.decoded, out, nrow))
    else:
        result.written.append(save_grid(samples, out, nrow))
    return result
