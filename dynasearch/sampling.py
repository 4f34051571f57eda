"""Sampling: class-conditional images (or latents) from a supernet, one of its subnets or a sliced model.

`sample_images` is the library call (deterministic under a seed); `save_grid` writes a PNG grid, `save_latents` an
`.npz` in the layout `load_dataset("npz:PATH")` reads; `run_sample` is what `dynasearch sample` runs. Latent models
(4 channels) can be decoded with a local diffusers AutoencoderKL folder; diffusers is optional and imported lazily.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint.native import load_checkpoint, read_config, read_schedule
from .device import resolve_device
from .diffusion.factory import diffusion_for
from .diffusion.gaussian import GaussianDiffusion
from .errors import CheckpointError, ConfigError, DynasearchError
from .fileio import atomic_write_bytes
from .model.config import DiTConfig
from .model.dit import DiT
from .model.schedule import SubnetSchedule, load_subnet_or_schedule
from .model.subnet import Subnet

__all__ = [
    "SAMPLERS",
    "DEFAULT_CFG_SCALE",
    "DEFAULT_STEPS",
    "LATENT_CHANNELS",
    "SampleConfig",
    "SampleResult",
    "sample_images",
    "cycle_labels",
    "repeat_labels",
    "parse_labels",
    "save_grid",
    "grid_array",
    "save_latents",
    "load_vae",
    "decode_latents",
    "resolve_device",
    "load_subnet_file",
    "checkpoint_subnet",
    "run_schedule",
    "diffusion_for",
    "run_sample",
]

SAMPLERS = ("ddim", "ddpm")
DEFAULT_CFG_SCALE = 4.0
DEFAULT_STEPS = 50
LATENT_CHANNELS = 4
"""Models with this many input channels are latent-space models (SD VAE latents): not clipped, saved as .npz."""

ProgressFn = Callable[[int, int], None]
"""progress(done, total): sampling steps done so far over every batch."""

_GRID_CELL_PX = 64  # small images are upscaled (nearest neighbour) to at least this many pixels per side
_GRID_PAD_PX = 2
_GRID_PAD_VALUE = 128  # mid grey: distinct from both the black background and the white ink of digits


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
            out.extend(range(int(span.group(1)), int(span.group(2)) + 1))
        else:
            raise ConfigError(
                f"--labels: cannot parse {tok!r} in {text!r}; give class ids like 0,1,2 or a range like 0-9"
            )
    return tuple(out)


def _check_labels(labels: Sequence[int], num_classes: int) -> None:
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
            raise ConfigError(f"label {label!r} is outside the model's classes [0, {num_classes - 1}]")




def _check_sampling_args(
    config: DiTConfig, cfg_scale: float, steps: int, sampler: str, diffusion: GaussianDiffusion
) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= diffusion.num_timesteps:
        raise ConfigError(f"steps must be an integer in [1, {diffusion.num_timesteps}], got {steps!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ConfigError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")
    if cfg_scale != 1.0 and config.class_dropout_prob <= 0:
        raise ConfigError(
            f"model '{config.name}' was built without label dropout, so it has no null class for "
            f"classifier-free guidance; use cfg_scale 1 (got {cfg_scale})"
        )


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
    diffusion = diffusion if diffusion is not None else diffusion_for(config)
    _check_sampling_args(config, float(cfg_scale), steps, sampler, diffusion)
    if subnet is not None:
        subnet.validate(config)
    if isinstance(subnet, SubnetSchedule) and subnet.buckets.num_timesteps != diffusion.num_timesteps:
        raise ConfigError(
            f"the schedule's timestep buckets end at {subnet.buckets.num_timesteps} but the diffusion has "
            f"{diffusion.num_timesteps} timesteps"
        )
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    dev = next(model.parameters()).device
    if device is not None:
        want = resolve_device(device)
        if want.type != dev.type or (want.index is not None and want.index != dev.index):
            raise ConfigError(f"the model is on {dev} but device {want} was requested; move it with model.to(...)")
    latent = config.in_channels == LATENT_CHANNELS
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    bs = len(label_list) if batch_size is None else batch_size
    batches = [label_list[i : i + bs] for i in range(0, len(label_list), bs)]
    total = len(batches) * steps
    done = 0

    def model_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if isinstance(subnet, SubnetSchedule):
            return run_schedule(model, subnet, x, t, y)
        return model(x, t, y, subnet=subnet, label_dropout=False)

    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in batches:
            shape = (len(batch), config.in_channels, config.input_size, config.input_size)
            y = torch.tensor(batch, dtype=torch.long)

            def step(k: int, n: int, _offset: int = done) -> None:
                if progress is not None:
                    progress(_offset + k + 1, total)

            kwargs = dict(
                cfg_scale=float(cfg_scale), generator=generator, device=dev, progress=step,
                null_class=config.num_classes, clip_denoised=not latent,
            )
            if sampler == "ddim":
                x = diffusion.ddim_sample(model_fn, shape, y, steps=steps, **kwargs)
            else:
                x = diffusion.ddpm_sample(model_fn, shape, y, steps=steps, **kwargs)
            outputs.append(x.float().cpu())
            done += steps
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


# ---------------------------------------------------------------------------------------------------------- writing
def grid_array(images: Tensor, nrow: int, scale: int | None = None, pad: int = _GRID_PAD_PX) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] (C = 1 or 3) tiled `nrow` per row into a uint8 (H', W') or (H', W', 3) array.

    Each image is upscaled by an integer factor with nearest neighbour (default: to at least 64 pixels per side,
    so 8x8 pixel art stays sharp); cells are separated by `pad` grey pixels.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"an image grid needs (B, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ConfigError("an image grid needs at least one image")
    if nrow < 1:
        raise ConfigError(f"images per row must be at least 1, got {nrow}")
    b, c, h, w = images.shape
    scale = max(1, math.ceil(_GRID_CELL_PX / max(h, w))) if scale is None else int(scale)
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    arr = arr.repeat(scale, axis=2).repeat(scale, axis=3)  # (B, C, h*s, w*s) nearest neighbour
    hs, ws = h * scale, w * scale
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = np.full((c, pad + rows * (hs + pad), pad + cols * (ws + pad)), _GRID_PAD_VALUE, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        top, left = pad + r * (hs + pad), pad + k * (ws + pad)
        grid[:, top : top + hs, left : left + ws] = arr[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(images: Tensor, path: str | Path, nrow: int, scale: int | None = None) -> Path:
    """Write `grid_array(images, nrow, scale)` as a PNG (atomically); returns the path."""
    from PIL import Image

    path = Path(path)
    grid = grid_array(images, nrow, scale)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    _write(path, buffer.getvalue())
    return path


def save_latents(latents: Tensor, labels: Sequence[int], path: str | Path, num_classes: int) -> Path:
    """Write latents as an `.npz` with x (N, C, H, W) float32, y (N,) int64 and num_classes (atomically).

    The layout is the one `load_dataset("npz:PATH")` reads; no pickled objects (allow_pickle is never needed).
    """
    path = Path(path)
    x = latents.detach().float().cpu().numpy()
    y = np.asarray(list(labels), dtype=np.int64)
    if x.ndim != 4 or len(x) != len(y):
        raise ConfigError(f"latents {x.shape} and {len(y)} labels do not match")
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y, num_classes=np.int64(num_classes))
    _write(path, buffer.getvalue())
    return path


def check_writable(path: Path) -> None:
    """Raise ConfigError now if `path` cannot be written later (its nearest existing parent is not a writable dir)."""
    if path.is_dir():
        raise ConfigError(f"cannot write '{path}': it is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write '{path}': '{parent}' is not a directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write '{path}': '{parent}' is not writable")


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write '{path}': {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------------- VAE
def _check_vae_folder(path: Path) -> None:
    """Raise CheckpointError unless `path` looks like a diffusers AutoencoderKL folder."""
    if not path.exists():
        raise CheckpointError(f"VAE folder '{path}' does not exist")
    if not path.is_dir():
        raise CheckpointError(f"VAE path '{path}' is not a folder (expected a diffusers AutoencoderKL folder)")
    config_file = path / "config.json"
    if not config_file.is_file() and (path / "vae" / "config.json").is_file():
        raise CheckpointError(f"'{path}' is a pipeline folder; pass its VAE sub-folder '{path / 'vae'}'")
    try:
        doc = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"VAE folder '{path}' has no config.json (not a diffusers AutoencoderKL folder)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"VAE config '{config_file}' cannot be read: {exc}") from None
    kind = doc.get("_class_name") if isinstance(doc, dict) else None
    if kind != "AutoencoderKL":
        raise CheckpointError(f"'{path}' holds a {kind or 'non-diffusers'} config, not a diffusers AutoencoderKL")
    if not any(path.glob("diffusion_pytorch_model*")):
        raise CheckpointError(f"VAE folder '{path}' has no weights (diffusion_pytorch_model.safetensors)")


def _import_autoencoder() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DynasearchError(
            "decoding latents with --vae needs the optional 'diffusers' package (pip install diffusers)"
        ) from None
    return AutoencoderKL


def load_vae(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """A diffusers AutoencoderKL from a local folder (never downloads), in eval mode on `device`."""
    path = Path(path)
    _check_vae_folder(path)
    autoencoder = _import_autoencoder()
    try:
        vae = autoencoder.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; each means "not a usable VAE folder"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"VAE folder '{path}' cannot be loaded: {first}") from None
    return vae.to(resolve_device(device)).eval()


@torch.no_grad()
def decode_latents(vae: Any, latents: Tensor, batch_size: int = 16) -> Tensor:
    """Images (B, 3, H*8, W*8) in [-1, 1] decoded from DiT latents (divided by the VAE's scaling factor first)."""
    scaling = float(getattr(getattr(vae, "config", None), "scaling_factor", None) or 0.18215)
    param = next(vae.parameters())
    images = []
    for chunk in latents.split(batch_size):
        out = vae.decode(chunk.to(device=param.device, dtype=param.dtype) / scaling).sample
        images.append(out.float().cpu().clamp(-1.0, 1.0))
    return torch.cat(images, dim=0)


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
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")
        if Path(self.out).suffix.lower() != ".png":
            raise ConfigError(f"--out must name a .png file, got '{self.out}'")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")

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
    diffusion = diffusion_for(model_config, doc)
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
