"""`dynasearch sample --npz`: the sample batch FID is computed from, in ADM's format, sharded over torchrun ranks.

Sample i has label i mod num_classes (every class equally often) and belongs to batch i // batch_size, whose noise
comes from its own generator seeded by (seed, batch index): the file is the same whether one process or K write it.
Under torchrun each rank samples a contiguous run of batches, decodes latents with the VAE, and appends uint8 NHWC
images to its own shard file beside the output (one batch in memory at a time); rank 0 then streams the shards into
one npz (`arr_0` images, `arr_1` labels) through a temporary file and removes them. The shards need a file system
every rank sees (one machine, or a shared one).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .adm_batch import IMAGES_KEY, LABELS_KEY, NpyShard, to_uint8_nhwc, write_batch_npz
from .checkpoint.native import load_checkpoint, read_config
from .checks import check_memory, check_seed, format_bytes
from .device import resolve_device
from .diffusion.factory import diffusion_for
from .diffusion.gaussian import GaussianDiffusion
from .diffusion.samplers import check_sampler
from .errors import CheckpointError, ConfigError, DynasearchError
from .fileio import disk_guard
from .images import check_writable, decode_latents, load_vae
from .model.config import DiTConfig
from .model.dit import DiT
from .model.schedule import SubnetSchedule
from .model.subnet import Subnet
from .sampling import (
    DEFAULT_CFG_SCALE,
    DEFAULT_STEPS,
    LATENT_CHANNELS,
    ProgressFn,
    check_sampling_args,
    checkpoint_subnet,
    sample_images,
)
from .train.dist import DistInfo, barrier

__all__ = ["NPZ_BATCH_SIZE", "NpzSampleConfig", "NpzSampleResult", "SamplingPlan", "batch_seed", "gather_shards",
           "image_batches", "plan_sampling", "rank_batches", "run_sample_npz", "sample_shard"]

NPZ_BATCH_SIZE = 32  # samples per batch (DiT's sample_ddp.py: 32 per GPU)


@dataclass(frozen=True)
class NpzSampleConfig:
    """Everything `dynasearch sample --npz` needs; validated on construction (ConfigError)."""

    checkpoint: Path
    npz: Path
    num: int = 50_000
    subnet_file: Path | None = None
    cfg_scale: float = DEFAULT_CFG_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str = "ddim"
    seed: int = 0
    device: str = "auto"
    vae: Path | None = None
    batch_size: int = NPZ_BATCH_SIZE
    dist_timeout: float = 1800.0

    def __post_init__(self) -> None:
        if Path(self.npz).suffix.lower() != ".npz":
            raise ConfigError(f"--npz must name a .npz file (ADM's sample batch), got '{self.npz}'")
        if self.num < 1:
            raise ConfigError(f"--num must be at least 1, got {self.num}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        check_sampler(self.sampler)
        check_seed(self.seed, "--seed", ConfigError)
        if not np.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale must be a finite number >= 0, got {self.cfg_scale}")


@dataclass
class NpzSampleResult:
    """What `run_sample_npz` wrote: the npz, its image count and shape, the processes that sampled it."""

    path: Path
    num: int
    image_shape: tuple[int, int, int]
    world: int
    seconds: float
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON summary."""
        return {"path": str(self.path), "num": self.num, "image_shape": list(self.image_shape), "world": self.world,
                "seconds": round(self.seconds, 3)}


@dataclass
class SamplingPlan:
    """A checked checkpoint to draw images from: its config, diffusion, subnet and (latent models) VAE folder."""

    checkpoint: Path
    config: DiTConfig
    diffusion: GaussianDiffusion
    subnet: Subnet | SubnetSchedule | None
    vae: Path | None
    cfg_scale: float
    steps: int
    sampler: str

    @property
    def latent(self) -> bool:
        """Whether the model generates latents (decoded by the VAE)."""
        return self.config.in_channels == LATENT_CHANNELS


def plan_sampling(
    checkpoint: Path, subnet_file: Path | None, vae: Path | None, cfg_scale: float, steps: int, sampler: str,
    purpose: str = "an ADM batch",
) -> SamplingPlan:
    """Check that the checkpoint can make uint8 RGB images: its config, the sampler arguments, the subnet, and a VAE
    exactly for latent models (each a one-line error naming the input); nothing heavy is loaded."""
    doc = read_config(checkpoint)
    try:
        config = DiTConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{checkpoint}': {exc}") from None
    diffusion = diffusion_for(config)
    check_sampling_args(config, float(cfg_scale), steps, sampler, diffusion)
    latent = config.in_channels == LATENT_CHANNELS
    if vae is not None and not latent:
        raise ConfigError(f"--vae decodes latents of 4-channel models; model '{config.name}' of checkpoint "
                          f"'{checkpoint}' has {config.in_channels} channel(s) and makes images itself")
    if vae is None and latent:
        raise ConfigError(f"checkpoint '{checkpoint}' generates latents: {purpose} needs images, so pass --vae DIR "
                          "(a local diffusers AutoencoderKL folder) to decode them")
    if not latent and config.in_channels not in (1, 3):
        raise ConfigError(f"model '{config.name}' makes {config.in_channels}-channel images; {purpose} takes 1 or 3")
    subnet = checkpoint_subnet(checkpoint, doc, config, subnet_file)
    return SamplingPlan(checkpoint, config, diffusion, subnet, vae, float(cfg_scale), steps, sampler)


def load_for_sampling(plan: SamplingPlan, device: torch.device) -> tuple[DiT, Any, tuple[int, int, int]]:
    """The model, its VAE (None for pixel models) and the (H, W, 3) of the images they make."""
    vae = load_vae(plan.vae, device) if plan.vae is not None else None
    size = plan.config.input_size
    if vae is not None:
        vc = vae.config
        if int(vc.latent_channels) != plan.config.in_channels:
            raise CheckpointError(f"VAE '{plan.vae}' has {vc.latent_channels} latent channels but model "
                                  f"'{plan.config.name}' generates {plan.config.in_channels}")
        size *= 2 ** (len(vc.block_out_channels) - 1)
    model = load_checkpoint(plan.checkpoint, device=device)
    return model, vae, (size, size, 3)


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index`'s generator: a hash of (seed, index), the same in every process."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rank_batches(num: int, batch_size: int, rank: int, world: int) -> range:
    """The batch indices rank `rank` of `world` samples: a contiguous run, the counts differing by at most one."""
    total = -(-num // batch_size)
    return range(rank * total // world, (rank + 1) * total // world)


def image_batches(
    model: DiT, plan: SamplingPlan, vae: Any, num: int, batch_size: int, seed: int, batches: range,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """uint8 (b, H, W, 3) images and (b,) labels of each batch in `batches` (of the `num` samples), one at a time."""
    classes = plan.config.num_classes
    total = len(batches) * plan.steps
    for k, b in enumerate(batches):
        lo, hi = b * batch_size, min((b + 1) * batch_size, num)
        labels = np.arange(lo, hi, dtype=np.int64) % classes  # (b,)
        report = None if progress is None else (lambda d, _t, off=k * plan.steps: progress(off + d, total))
        x = sample_images(
            model, labels.tolist(), cfg_scale=plan.cfg_scale, steps=plan.steps, sampler=plan.sampler,
            seed=batch_seed(seed, b), subnet=plan.subnet, progress=report, diffusion=plan.diffusion,
        )  # (b, C, h, w): images in [-1, 1] or latents
        images = decode_latents(vae, x) if vae is not None else x  # (b, C', H, W) in [-1, 1]
        yield to_uint8_nhwc(images), labels


def _shard_paths(npz: Path, rank: int, world: int) -> tuple[Path, Path]:
    """Rank `rank`'s image and label shard files beside the output."""
    folder = npz.parent / f".{npz.name}.shards"
    return folder / f"images-{rank:05d}-of-{world:05d}.npy", folder / f"labels-{rank:05d}-of-{world:05d}.npy"


def sample_shard(
    config: NpzSampleConfig, plan: SamplingPlan, model: DiT, vae: Any, image_shape: tuple[int, int, int],
    rank: int, world: int, progress: ProgressFn | None = None,
) -> tuple[Path, Path]:
    """Sample rank `rank`'s batches into its two shard files (removed again on any failure); returns their paths."""
    batches = rank_batches(config.num, config.batch_size, rank, world)
    count = max(0, min(batches.stop * config.batch_size, config.num) - batches.start * config.batch_size)
    paths = _shard_paths(Path(config.npz), rank, world)
    shards: list[NpyShard] = []
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        shards.append(NpyShard(paths[0], (count, *image_shape), np.uint8))
        shards.append(NpyShard(paths[1], (count,), np.int64))
        for x, y in image_batches(model, plan, vae, config.num, config.batch_size, config.seed, batches, progress):
            if x.shape[1:] != image_shape:
                raise CheckpointError(f"the VAE decoded images of shape {x.shape[1:]}, expected {image_shape}")
            shards[0].append(x)
            shards[1].append(y)
        for shard in shards:
            shard.close()
    except BaseException:
        for shard in shards:
            shard.discard()
        with contextlib.suppress(OSError):
            paths[0].parent.rmdir()  # only if no other rank's shard is in it
        raise
    return paths


def gather_shards(npz: Path, world: int) -> Path:
    """Stream the shards of ranks 0..world-1 into the npz (in rank order) and remove them."""
    shards = [_shard_paths(npz, r, world) for r in range(world)]
    missing = [str(p) for pair in shards for p in pair if not p.is_file()]
    if missing:
        raise DynasearchError(f"cannot write '{npz}': shard '{missing[0]}' is missing (did another process fail?)")
    try:
        write_batch_npz(npz, {IMAGES_KEY: [s[0] for s in shards], LABELS_KEY: [s[1] for s in shards]})
    finally:  # written or not (a full disk: the npz is left as it was), the shards go
        shutil.rmtree(shards[0][0].parent, ignore_errors=True)
    return npz


def _check_space(npz: Path, num: int, image_shape: tuple[int, int, int]) -> None:
    """ConfigError now if the disk cannot hold the shards and the npz (twice the images) at the end."""
    need = 2 * num * int(np.prod(image_shape)) + 16 * num + (1 << 20)
    parent = npz.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError(f"cannot write '{npz}': no space left for {num} images of {image_shape}: they need "
                          f"{format_bytes(need)} free (shards and npz), '{parent}' has {format_bytes(free)}")


def _join(config: NpzSampleConfig) -> tuple[DistInfo, torch.device]:
    """This process's rank and device: torchrun's process group (gloo on the CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if world <= 1:
        return DistInfo(), device
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=config.dist_timeout))
        except (RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DynasearchError(f"rank {os.environ.get('RANK', '?')} of {world}: joining the process group "
                                  f"failed ({first})") from None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def run_sample_npz(config: NpzSampleConfig, progress: ProgressFn | None = None) -> NpzSampleResult:
    """Check every input, then sample `config.num` images into ADM's batch format (sharded under torchrun; only
    rank 0 reports progress and writes the npz). Nothing is written before the checks pass."""
    start = time.perf_counter()
    npz = Path(config.npz)
    plan = plan_sampling(config.checkpoint, config.subnet_file, config.vae, config.cfg_scale, config.steps,
                         config.sampler)
    check_writable(npz)
    ddp, device = _join(config)
    try:
        model, vae, image_shape = load_for_sampling(plan, device)
        c = plan.config
        check_memory(8 * config.batch_size * (c.in_channels * c.input_size**2 + int(np.prod(image_shape))),
                     f"--batch-size {config.batch_size}", ConfigError)
        _check_space(npz, config.num, image_shape)
        with disk_guard(npz):  # a disk that fills up anyway: one line naming the output, the shards removed
            sample_shard(config, plan, model, vae, image_shape, ddp.rank, ddp.world,
                         progress if ddp.is_main else None)
            barrier(ddp)
            if ddp.is_main:
                gather_shards(npz, ddp.world)
    finally:
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return NpzSampleResult(npz, config.num, image_shape, ddp.world, time.perf_counter() - start, ddp.rank)
