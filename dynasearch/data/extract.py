"""`dynasearch extract-latents`: a folder of class sub-folders of images turned into a `latents:DIR` directory with a
local diffusers AutoencoderKL, resumable and split over torchrun ranks.

Each image is centre-cropped and resized as ADM and DiT do (halving with a box filter while the shorter side is at
least twice the size, then bicubic, then the centre crop), scaled to [-1, 1] and encoded as
``vae.encode(x).latent_dist.sample() * scaling_factor``; the sample's noise of row i is drawn from its own seeded
generator, so the file does not depend on the batch size, the number of ranks or where a run was interrupted.
``--flip`` also stores every image's mirror image (rows N..2N-1, same labels): a latent cannot be flipped later, a
flipped latent is not the latent of the flipped image.

The directory is written in this order: ``progress.npy`` (uint8 per row, 1 = written; present while unfinished),
``meta.json`` (what the extraction is: VAE, scaling factor, class names, flip, image size, ...), ``labels.npy`` and
a preallocated ``latents.npy`` (numpy's open_memmap, blocks reserved up front so a full disk is one error, not a
crash). Every rank then encodes its share of the rows still to do, writing them into the memory map, flushing, then
marking them in ``progress.npy``; rank 0 removes ``progress.npy`` when every row is there. A rerun of the same
command continues where the last one stopped, with any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.lib.format import open_memmap
from rich.console import Console
from torch import Tensor

from ..checks import (
    check_int,
    check_memory,
    check_new_dir,
    check_seed,
    disk_full,
    format_bytes,
    is_disk_full,
)
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, DataError, DiskFullError
from ..fileio import atomic_output, atomic_write_text, read_json
from ..images import check_vae_folder, load_vae
from ..progress_bar import progress_bar
from .dataset import parse_data_spec
from .latents import LABELS_NAME, LATENTS_NAME, META_NAME, PROGRESS_NAME
from .loaders import list_folder, load_adm_image

__all__ = ["DTYPES", "ExtractConfig", "ExtractResult", "encode_rows", "extract_latents", "row_seed"]

DTYPES = ("float16", "float32")
FORMAT = "dynasearch-latents"
_PLAN_KEYS = ("format", "version", "source", "listing", "num_images", "num", "shape", "dtype", "image_size", "flip",
              "vae", "scaling_factor", "seed", "sampling")  # what a resumed or repeated extraction must match


@dataclass(frozen=True)
class ExtractConfig:
    """What `dynasearch extract-latents` is asked to do."""

    data: str  # folder:PATH
    vae: str  # a local diffusers AutoencoderKL folder
    out: str
    image_size: int = 256
    flip: bool = False
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float16"
    seed: int = 0
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ConfigError/DataError for values outside their domain (nothing is read or written)."""
        check_int(self.image_size, "--image-size", 1, error=ConfigError)
        check_int(self.batch_size, "--batch-size", 1, error=ConfigError)
        check_seed(self.seed, error=ConfigError)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        spec = parse_data_spec(self.data)
        if spec.kind != "folder":
            raise DataError(f"extract-latents encodes images: --data must be folder:PATH, got '{self.data}'")
        check_memory(self.batch_size * 3 * self.image_size**2 * 4 * 4,
                     f"--batch-size {self.batch_size} at --image-size {self.image_size}", ConfigError)
        check_new_dir(self.out, "--out", ConfigError)


@dataclass
class ExtractResult:
    """What an extraction did: the directory, the array's shape and dtype, rows found done and rows encoded here."""

    out: Path
    shape: tuple[int, ...]
    dtype: str
    already: int  # rows written before this run
    encoded: int  # rows this process encoded
    seconds: float
    rank: int = 0
    world: int = 1
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------
def row_seed(seed: int, row: int) -> int:
    """The 63-bit seed of the sampling noise of latent row `row`."""
    digest = hashlib.sha256(f"dynasearch:{seed}:{row}:latent".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def encode_rows(vae: Any, images: Tensor, rows: Sequence[int], seed: int, scaling: float) -> Tensor:
    """`vae.encode(images).latent_dist.sample() * scaling` (B, C, h, w) float32 on the CPU, the noise of each row
    drawn from ``torch.Generator().manual_seed(row_seed(seed, row))`` as diffusers' sample(generator) draws it."""
    param = next(vae.parameters())
    posterior = vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
    mean, std = posterior.mean, posterior.std  # (B, C, h, w) each
    noise = torch.cat([
        torch.randn((1, *mean.shape[1:]), generator=torch.Generator().manual_seed(row_seed(seed, int(r))),
                    dtype=mean.dtype)
        for r in rows
    ]).to(mean.device)  # (B, C, h, w)
    return ((mean + std * noise) * scaling).float().cpu()


# ---------------------------------------------------------------------------------------------------------------------
# The VAE folder
# ---------------------------------------------------------------------------------------------------------------------
def _vae_info(path: Path, image_size: int) -> dict[str, Any]:
    """latent_channels, down-sampling factor and scaling_factor of a VAE folder's config.json (checked for
    `image_size` before diffusers is imported)."""

    check_vae_folder(path)
    doc = read_json(path / "config.json", "VAE config", CheckpointError)
    blocks = doc.get("block_out_channels", [128, 256, 512, 512])
    channels, scaling = doc.get("latent_channels", 4), doc.get("scaling_factor", 0.18215)
    ok = isinstance(blocks, list) and blocks and isinstance(channels, int) and channels > 0 \
        and isinstance(scaling, (int, float)) and not isinstance(scaling, bool)
    if not ok:
        raise CheckpointError(f"VAE config '{path / 'config.json'}' has invalid block_out_channels, latent_channels "
                              "or scaling_factor")
    factor = 2 ** (len(blocks) - 1)
    if image_size % factor:
        raise ConfigError(f"--image-size {image_size} is not a multiple of {factor}, the VAE's down-sampling factor")
    return {"latent_channels": channels, "factor": factor, "scaling_factor": float(scaling)}


def _load_vae(path: Path, device: torch.device) -> Any:
    """The AutoencoderKL of `path` on `device` (DataError without diffusers, CheckpointError if it cannot load)."""
    if find_spec("diffusers") is None:
        raise DataError(f"--vae '{path}': loading it needs the optional 'diffusers' package (pip install diffusers)")
    from diffusers.utils import logging as diffusers_logging


    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # e.g. its advice to install accelerate: not the user's one line
    try:
        return load_vae(path, device)
    finally:
        diffusers_logging.set_verbosity(before)


# ---------------------------------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------------------------------
def _plan(
    cfg: ExtractConfig, files: list[Path], labels: list[int], classes: list[str], vae: dict[str, Any]
) -> dict[str, Any]:
    """meta.json of this extraction (the keys of _PLAN_KEYS must match for a resume)."""
    given = Path(parse_data_spec(cfg.data).path or "")
    root = given.resolve()
    listing = hashlib.sha256(
        "\n".join(f"{y}\t{f.relative_to(given)}" for f, y in zip(files, labels, strict=True)).encode()
    )
    n = len(files) * (2 if cfg.flip else 1)
    h = cfg.image_size // vae["factor"]
    return {
        "format": FORMAT, "version": 1, "source": str(root), "listing": listing.hexdigest(), "num_images": len(files),
        "num": n, "shape": [n, vae["latent_channels"], h, h], "dtype": cfg.dtype, "image_size": cfg.image_size,
        "flip": cfg.flip, "vae": str(Path(cfg.vae).resolve()), "scaling_factor": vae["scaling_factor"],
        "seed": cfg.seed, "sampling": "latent_dist.sample() * scaling_factor", "num_classes": len(classes),
        "class_names": classes,
        "rows": "0..num_images-1: the images in class-folder order" + (", then their mirrors" if cfg.flip else ""),
    }


def _state(out: Path, plan: dict[str, Any], overwrite: bool) -> str:
    """'fresh', 'resume' or 'complete' for `out`; ConfigError if it holds another extraction (unless overwrite)."""
    names = [n for n in (PROGRESS_NAME, META_NAME, LABELS_NAME, LATENTS_NAME) if (out / n).exists()]
    if not names or overwrite:
        return "fresh"
    unfinished = (out / PROGRESS_NAME).exists()
    if unfinished and not all((out / n).exists() for n in (META_NAME, LABELS_NAME, LATENTS_NAME)):
        return "fresh"  # created up to a crash before any row was encoded
    meta = read_json(out / META_NAME, "latents meta file", ConfigError) if (out / META_NAME).exists() else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"--out '{out}' already holds {', '.join(names)} not written by extract-latents; pass "
                          "--overwrite to replace them, or another --out")
    differ = next((k for k in _PLAN_KEYS if meta.get(k) != plan.get(k)), None)
    if differ is not None:
        what = "an unfinished extraction" if unfinished else "the latents of another extraction"
        raise ConfigError(f"--out '{out}' holds {what} with another {differ} ({meta.get(differ)!r}, now "
                          f"{plan.get(differ)!r}); pass --overwrite to start over, or another --out")
    if unfinished:
        _check_array(out, plan)
        return "resume"
    if not all((out / n).exists() for n in (LABELS_NAME, LATENTS_NAME)):
        raise ConfigError(f"--out '{out}' has {META_NAME} but lacks {LATENTS_NAME} or {LABELS_NAME}; pass "
                          "--overwrite to extract again")
    return "complete"


def _check_array(out: Path, plan: dict[str, Any]) -> None:
    """ConfigError unless the latents.npy an unfinished extraction left has the planned shape and dtype."""
    try:
        array = np.load(out / LATENTS_NAME, mmap_mode="r", allow_pickle=False)
        got = (list(array.shape), str(array.dtype))
    except (OSError, ValueError, EOFError, AttributeError):
        got = None
    if got != (plan["shape"], plan["dtype"]):
        raise ConfigError(f"--out '{out}': the unfinished extraction's {LATENTS_NAME} is damaged (not a "
                          f"{plan['dtype']} array of shape {tuple(plan['shape'])}); pass --overwrite to start over")


def _check_space(out: Path, nbytes: int) -> None:
    """ConfigError when `out` cannot be written; DiskFullError naming latents.npy when its file system has fewer than
    `nbytes` free (a latents.npy that is to be replaced counts as free)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):  # root ignores modes: only a write tells a read-only file system
            pass
    except OSError as exc:
        raise ConfigError(f"--out '{out}' cannot be written: '{probe}' is not writable "
                          f"({exc.strerror or exc})") from None
    old = out / LATENTS_NAME
    free = shutil.disk_usage(probe).free + (old.stat().st_size if old.is_file() else 0)
    if free < nbytes:
        raise DiskFullError(f"cannot write '{old}': it needs {format_bytes(nbytes)} and '{probe}' has "
                            f"{format_bytes(free)} free")


def _save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as the .npy file `path`, written atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _create(out: Path, plan: dict[str, Any], labels: np.ndarray) -> None:
    """Write progress.npy (zeros), meta.json, labels.npy and a preallocated latents.npy; on failure remove them."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name in (PROGRESS_NAME, META_NAME, LABELS_NAME, LATENTS_NAME):
            (out / name).unlink(missing_ok=True)
        _save_npy(out / PROGRESS_NAME, np.zeros(plan["num"], dtype=np.uint8))
        atomic_write_text(out / META_NAME, json.dumps(plan, indent=2) + "\n")
        _save_npy(out / LABELS_NAME, labels)
        array = open_memmap(out / LATENTS_NAME, mode="w+", dtype=np.dtype(plan["dtype"]), shape=tuple(plan["shape"]))
        size = array.offset + array.nbytes
        del array
        with open(out / LATENTS_NAME, "r+b") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)  # blocks reserved now: no SIGBUS on a full disk later
    except BaseException as exc:
        for name in (PROGRESS_NAME, META_NAME, LABELS_NAME, LATENTS_NAME):
            (out / name).unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(out / LATENTS_NAME) from None
        raise


# ---------------------------------------------------------------------------------------------------------------------
# The extraction
# ---------------------------------------------------------------------------------------------------------------------
def _join_group(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world, whether this call created the process group) under torchrun; (0, 1, False) without."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, False
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"joining the torchrun process group failed: {str(exc).splitlines()[0]}") from None
        owns = True
    return dist.get_rank(), dist.get_world_size(), owns


def _device(name: str) -> torch.device:
    """The encoding device: `name` resolved, CUDA as the local rank's GPU under torchrun."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def _raise_unless_all_ok(world: int, device: torch.device, error: BaseException | None, other: str) -> None:
    """Re-raise this rank's `error`, or raise DataError(`other`) when another rank had one (one all-reduce of the
    ranks' failure flags under torchrun)."""
    failed = error is not None
    if world > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flag)
        failed = failed or float(flag.item()) > 0
    if error is not None:
        raise error
    if failed:
        raise DataError(other)


def _barrier(world: int) -> None:
    """Wait for every rank (nothing without torchrun)."""
    if world > 1:
        dist.barrier()


def extract_latents(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Encode `cfg.data`'s images into `cfg.out` (see the module docstring); every check runs before any write."""
    t0 = time.perf_counter()
    cfg.validate()
    out, vae_path = Path(cfg.out), Path(cfg.vae)
    vae_cfg = _vae_info(vae_path, cfg.image_size)
    files, labels, classes = list_folder(parse_data_spec(cfg.data).path or "")
    plan = _plan(cfg, files, labels, classes, vae_cfg)
    state = _state(out, plan, cfg.overwrite)
    device = _device(cfg.device)
    shape = tuple(plan["shape"])
    if state == "complete":
        return ExtractResult(out, shape, cfg.dtype, plan["num"], 0, time.perf_counter() - t0)
    nbytes = int(np.prod(shape)) * np.dtype(cfg.dtype).itemsize
    if state == "fresh":
        _check_space(out, nbytes)
    vae = _load_vae(vae_path, device)
    rank, world, owns = _join_group(device)
    try:
        error: BaseException | None = None
        if state == "fresh" and rank == 0:
            try:
                _create(out, plan, np.asarray([labels[r % len(files)] for r in range(plan["num"])], dtype=np.int64))
            except BaseException as exc:
                error = exc
        _raise_unless_all_ok(world, device, error, f"extraction into '{out}': rank 0 could not create its files")
        done = np.load(out / PROGRESS_NAME, mmap_mode="r+")
        already = int(done.sum())
        mine = np.array_split(np.flatnonzero(np.asarray(done) == 0), world)[rank]
        _barrier(world)  # every rank has read the rows to do before any is marked
        encoded = 0
        try:
            encoded = _encode(cfg, vae, vae_cfg["scaling_factor"], files, out, done, mine, progress and rank == 0)
        except BaseException as exc:
            error = exc
        _raise_unless_all_ok(world, device, error, f"extraction into '{out}': another rank failed; the rows written "
                                                   "are kept: rerun the same command to resume")
        if rank == 0:
            missing = int((np.asarray(done) == 0).sum())
            if missing:
                raise DataError(f"extraction into '{out}': {missing} rows were not written; rerun the same command "
                                "to finish")
            del done
            (out / PROGRESS_NAME).unlink()
        _barrier(world)
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
    return ExtractResult(out, shape, cfg.dtype, already, encoded, time.perf_counter() - t0, rank, world,
                         [out / LATENTS_NAME, out / LABELS_NAME, out / META_NAME])


def _encode(cfg: ExtractConfig, vae: Any, scaling: float, files: list[Path], out: Path, done: np.ndarray,
            rows: np.ndarray, show: bool) -> int:
    """Encode `rows` in batches into latents.npy, marking each batch in `done` after it is flushed; returns the
    number of rows encoded (a KeyboardInterrupt says how to resume)."""
    latents = np.load(out / LATENTS_NAME, mmap_mode="r+")
    handle = getattr(latents, "_mmap", None)
    n_img, count = len(files), 0
    console = Console(stderr=True)
    live = show and console.is_terminal  # elsewhere (logs, CI): a plain line on stdout every tenth of the rows
    bar = progress_bar("[bold]extract-latents", console=console, disable=not live, transient=False)
    every, t0 = max(1, len(rows) // 10), time.perf_counter()
    try:
        with bar:
            task = bar.add_task("extract-latents", total=len(rows))
            for start in range(0, len(rows), cfg.batch_size):
                batch = rows[start : start + cfg.batch_size]
                images = torch.from_numpy(np.stack([
                    load_adm_image(files[r % n_img], cfg.image_size, flip=r >= n_img) for r in batch
                ]))  # (b, 3, S, S)
                z = encode_rows(vae, images, batch, cfg.seed, scaling)  # (b, C, h, w)
                latents[batch] = z.numpy().astype(latents.dtype)
                latents.flush()
                if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
                    handle.madvise(mmap.MADV_DONTNEED)  # written back: give the pages up
                done[batch] = 1
                done.flush()
                count += len(batch)
                bar.update(task, advance=len(batch))
                if show and not live and (count // every > (count - len(batch)) // every or count == len(rows)):
                    rate = count / max(1e-9, time.perf_counter() - t0)
                    print(f"extract-latents: {count}/{len(rows)} rows | {rate:.1f} rows/s", flush=True)
    except KeyboardInterrupt:
        total = int(np.asarray(done).sum())
        raise KeyboardInterrupt(f"interrupted with {total} of {len(done)} rows written to '{out}'; rerun the same "
                                "command to resume") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(out / LATENTS_NAME) from None
        raise
    return count
