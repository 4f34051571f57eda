"""`dynasearch extract-latents`: a folder of images -> a `latents:DIR` directory (options -> ExtractConfig ->
extract_latents)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ._app import app, console, stop


class Device(str, Enum):
    """--device choices."""
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LatentDtype(str, Enum):
    """--dtype choices."""
    float16 = "float16"
    float32 = "float32"


@app.command(name="extract-latents")
def extract_latents(
    data: str = typer.Option(..., help="folder:PATH, one sub-folder of images per class (ImageNet's train layout)."),
    vae: Path = typer.Option(..., help="Local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema); never downloaded."),
    out: Path = typer.Option(
        ..., help="Directory for latents.npy, labels.npy and meta.json (train with --data latents:OUT)."
    ),
    image_size: int = typer.Option(256, min=1, help="Image size after ADM's centre crop (latents are 1/8 of it)."),
    flip: bool = typer.Option(False, "--flip", help="Also store every image's mirror image (doubles the rows)."),
    batch_size: int = typer.Option(32, min=1, help="Images encoded at once (per process under torchrun)."),
    device: Device = typer.Option(Device.auto, help="auto: CUDA when available (the local rank's GPU), else CPU."),
    dtype: LatentDtype = typer.Option(LatentDtype.float16, help="Stored precision of the latents."),
    seed: int = typer.Option(0, help="Seed of the VAE's sampling noise (each row has its own)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace another extraction's files in --out."),
) -> None:
    """Encode a folder of class sub-folders of images with a VAE into memory-mappable latents; a rerun resumes."""
    from ..data.extract import ExtractConfig
    from ..data.extract import extract_latents as run_extraction

    config = ExtractConfig(
        data=data, vae=str(vae), out=str(out), image_size=image_size, flip=flip, batch_size=batch_size,
        device=device.value, dtype=dtype.value, seed=seed, overwrite=overwrite,
    )
    try:
        result = run_extraction(config, progress=True)
    except KeyboardInterrupt as exc:  # the rows written so far are kept: the same command resumes
        raise stop(str(exc) or "interrupted", 130) from None
    if result.rank != 0:
        return
    shape = "x".join(str(v) for v in result.shape)
    if not result.files:
        console.print(f"'{out}' already holds these {shape} latents; nothing to do", highlight=False,
                      soft_wrap=True)
        return
    resumed = f" ({result.already} already there)" if result.already else ""
    console.print(f"wrote {out}: latents.npy ({shape} {result.dtype}), labels.npy, meta.json; "
                  f"{result.encoded} rows encoded in {result.seconds:.1f} s{resumed}", highlight=False,
                  soft_wrap=True)
    console.print(f"train on them with --data latents:{out}", highlight=False, soft_wrap=True)
