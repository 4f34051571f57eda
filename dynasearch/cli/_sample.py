"""`dynasearch sample` and `dynasearch eval`: image grids from a checkpoint, and its generative quality."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..data import ACCEPTED as DATA_SPECS
from ..sampling import DEFAULT_CFG_SCALE, DEFAULT_STEPS
from ._app import app, console, err_console


class Sampler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@contextmanager
def step_bar(description: str) -> Iterator:
    """A rich progress bar on stderr over sampling steps; yields the progress(done, total) callback.

    The bar starts at the first step, so errors found before sampling print only their one line.
    """
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    task = bar.add_task(description, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            bar.stop()


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="Supernet, training run or sliced checkpoint directory."),
    subnet: Path | None = typer.Option(
        None, help="Subnet or timestep-schedule JSON file to run (supernets; timestep-dynamic checkpoints switch "
                   "subnets per step by themselves)."
    ),
    labels: str | None = typer.Option(None, help="Classes, one grid row each: '0,1,2' or '0-9'."),
    num: int | None = typer.Option(None, min=1, help="Number of samples, labels cycling over the classes."),
    per_label: int = typer.Option(8, min=1, help="Samples per label (the grid's columns) with --labels."),
    cfg_scale: float = typer.Option(DEFAULT_CFG_SCALE, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps."),
    sampler: Sampler = typer.Option(Sampler.ddim, help="Sampler."),
    seed: int = typer.Option(0, help="Random seed (same seed, same samples)."),
    out: Path | None = typer.Option(None, help="PNG grid to write (default samples.png; latent models: also OUT.npz)."),
    device: Device = typer.Option(Device.auto, help="Device."),
    vae: Path | None = typer.Option(None, help="Local diffusers AutoencoderKL folder to decode latents."),
    npz: Path | None = typer.Option(
        None, help="Write ADM's sample batch instead of a grid: arr_0 uint8 (N, H, W, 3) images, arr_1 labels; --num "
                   "of them (default 50000), sharded under torchrun."
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Samples per batch (default 256; with --npz 32, each batch seeded by (seed, index))."
    ),
) -> None:
    """Sample class-conditional images from a checkpoint and write them as a grid (or, with --npz, as ADM's batch)."""
    from ..sampling import SampleConfig, parse_labels, run_sample

    if npz is not None:
        _sample_npz(checkpoint, subnet, labels, num, out, cfg_scale, steps, sampler, seed, device, vae, npz, batch_size)
        return
    config = SampleConfig(
        checkpoint=checkpoint,
        subnet_file=subnet,
        labels=parse_labels(labels) if labels is not None else None,
        num=num,
        per_label=per_label,
        cfg_scale=cfg_scale,
        steps=steps,
        sampler=sampler.value,
        seed=seed,
        out=out if out is not None else Path("samples.png"),
        device=device.value,
        vae=vae,
        **({"batch_size": batch_size} if batch_size is not None else {}),
    )
    with step_bar("sampling") as progress:
        result = run_sample(config, progress=progress)
    shape = "x".join(str(v) for v in result.samples.shape[1:])
    kind = "latents" if result.latent else "images"
    for path in result.written:
        console.print(f"wrote {path}", highlight=False)
    console.print(f"{len(result.labels)} {kind} ({shape}), seed {seed}", highlight=False)
    if result.latent and vae is None:
        console.print("latent model: pass --vae PATH (a diffusers AutoencoderKL folder) to decode the grid",
                      highlight=False)


def _sample_npz(
    checkpoint: Path, subnet: Path | None, labels: str | None, num: int | None, out: Path | None,
    cfg_scale: float, steps: int, sampler: Sampler, seed: int, device: Device, vae: Path | None, npz: Path,
    batch_size: int | None,
) -> None:
    """`sample --npz`: ADM's sample batch (every torchrun rank runs this; rank 0 prints)."""
    from ..errors import ConfigError
    from ..sample_npz import NPZ_BATCH_SIZE, NpzSampleConfig, run_sample_npz

    if labels is not None or out is not None:
        raise ConfigError(f"--npz writes --num samples with labels cycling over the classes; "
                          f"{'--labels' if labels is not None else '--out'} is for grids")
    config = NpzSampleConfig(
        checkpoint=checkpoint, npz=npz, num=num if num is not None else 50_000, subnet_file=subnet,
        cfg_scale=cfg_scale, steps=steps, sampler=sampler.value, seed=seed, device=device.value, vae=vae,
        batch_size=batch_size if batch_size is not None else NPZ_BATCH_SIZE,
    )
    with step_bar("sampling") as progress:
        result = run_sample_npz(config, progress=progress)
    if result.rank == 0:
        h, w, c = result.image_shape
        console.print(f"wrote {result.path}: {result.num} images ({h}x{w}x{c} uint8, arr_0) and labels (arr_1), "
                      f"seed {seed}, {result.world} process(es), {result.seconds:.1f} s", highlight=False)


@app.command(name="eval")
def eval_(
    checkpoint: Path | None = typer.Option(
        None, help="Supernet, training run or sliced checkpoint directory (its samples are scored)."
    ),
    subnet: Path | None = typer.Option(
        None, help="Subnet or timestep-schedule JSON file to evaluate (supernets; timestep-dynamic checkpoints switch "
                   "per step by themselves)."
    ),
    num: int | None = typer.Option(
        None, min=2, help="Generated samples, labels cycling over the classes (default 1000; with --inception-weights "
                          "50000)."
    ),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps."),
    cfg_scale: float = typer.Option(DEFAULT_CFG_SCALE, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, help="Random seed."),
    sampler: Sampler = typer.Option(Sampler.ddim, help="Sampler."),
    device: Device = typer.Option(Device.auto, help="Device."),
    data: str | None = typer.Option(
        None, help=f"The data it was trained on ({DATA_SPECS}), overriding its config.json's record."
    ),
    inception_weights: Path | None = typer.Option(
        None, help="FID as ADM/DiT report it: FID's Inception-v3 weights file "
                   "(weights-inception-2015-12-05-6726825d.pth)."
    ),
    ref: str | None = typer.Option(
        None, help="With --inception-weights: an ADM reference batch REF.npz (its mu/sigma, else its arr_0 images) or "
                   "folder:PATH of real images."
    ),
    samples: Path | None = typer.Option(
        None, help="With --inception-weights: score this ADM sample batch (arr_0) instead of sampling a checkpoint."
    ),
    vae: Path | None = typer.Option(
        None, help="With --inception-weights: local diffusers AutoencoderKL folder decoding a latent model's samples."
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Samples per sampling batch (default 250; with --inception-weights 32, as sample --npz)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Frechet distance to the data the model was trained on, in that data's classifier's features, and the class
    accuracy; with --inception-weights, the FID of ADM and DiT against a reference batch."""
    from ..errors import ConfigError
    from ..quality import EvalConfig, run_eval

    if inception_weights is not None or ref is not None or samples is not None:
        _eval_fid(checkpoint, subnet, num, steps, cfg_scale, seed, sampler, device, data, inception_weights, ref,
                  samples, vae, batch_size, as_json)
        return
    if vae is not None:
        raise ConfigError("--vae decodes samples for Inception features: give it with "
                          "--inception-weights FILE --ref REF")
    if checkpoint is None:
        raise ConfigError("give --checkpoint DIR (or --inception-weights FILE --ref REF with --samples FILE.npz)")
    config = EvalConfig(
        checkpoint=checkpoint, subnet_file=subnet, num=num if num is not None else 1000, steps=steps,
        cfg_scale=cfg_scale, seed=seed, sampler=sampler.value, device=device.value, data=data,
        **({"batch_size": batch_size} if batch_size is not None else {}),
    )

    def status(message: str) -> None:
        err_console.print(message, highlight=False)

    with step_bar("sampling") as progress:
        result = run_eval(config, progress=progress, status=status)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    title = f"{result.model}: " + (f"subnet {subnet}" if subnet is not None else "default subnet")
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [
        ("reference", f"{result.reference} {result.reference_split}, {result.num_real} images"),
        (f"Frechet distance ({result.extractor} features)", f"{result.fd:.3f}"),
        ("class accuracy of the samples", pct(result.class_accuracy)),
        (f"classifier accuracy on {result.reference} val ({result.classifier_val} images)",
         pct(result.classifier_accuracy)),
        ("samples", f"{result.num}"),
        ("sampler, steps, cfg scale, seed", f"{result.sampler}, {result.steps}, {result.cfg_scale:g}, {result.seed}"),
        ("sampling time", f"{result.sample_seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _eval_fid(
    checkpoint: Path | None, subnet: Path | None, num: int | None, steps: int, cfg_scale: float, seed: int,
    sampler: Sampler, device: Device, data: str | None, inception_weights: Path | None, ref: str | None,
    samples: Path | None, vae: Path | None, batch_size: int | None, as_json: bool,
) -> None:
    """`eval --inception-weights FILE --ref REF`: FID of a sample batch or a checkpoint's samples."""
    from ..errors import ConfigError
    from ..quality import FidConfig, run_fid
    from ..sample_npz import NPZ_BATCH_SIZE

    if inception_weights is None:
        raise ConfigError(f"{'--ref' if ref is not None else '--samples'} is for FID: give --inception-weights FILE "
                          "(FID's Inception-v3 weights) with it")
    if ref is None:
        raise ConfigError("--inception-weights needs --ref: an ADM reference batch REF.npz or folder:PATH of real "
                          "images")
    if data is not None:
        raise ConfigError("--data picks the built-in classifier's data; with --inception-weights the reference is "
                          "--ref")
    if samples is not None and num is not None:
        raise ConfigError("--num sets how many samples to generate; --samples scores every image of its arr_0")
    config = FidConfig(
        inception_weights=inception_weights, ref=ref, samples=samples, checkpoint=checkpoint, subnet_file=subnet,
        vae=vae, num=num if num is not None else 50_000, steps=steps, cfg_scale=cfg_scale, seed=seed,
        sampler=sampler.value, device=device.value,
        batch_size=batch_size if batch_size is not None else NPZ_BATCH_SIZE,
    )

    def status(message: str) -> None:
        err_console.print(message, highlight=False)

    with step_bar("sampling / Inception features") as progress:
        result = run_fid(config, progress=progress, status=status)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    table = Table(title=f"FID of {result.samples}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    ref_text = result.reference + (" (stored mu/sigma)" if result.reference_images is None
                                   else f" ({result.reference_images} images)")
    rows = [("FID (Inception-v3 pool features)", f"{result.fid:.4f}"), ("samples", f"{result.num}"),
            ("image size", "x".join(str(v) for v in result.image_shape)), ("reference", ref_text),
            ("Inception weights", result.inception_weights)]
    if result.sampling is not None:
        sm = result.sampling
        setting = f"{sm['sampler']}, {sm['steps']}, {sm['cfg_scale']:g}, {sm['seed']}"
        rows.append(("sampler, steps, cfg scale, seed", setting))
    rows.append(("time", f"{result.seconds:.1f} s"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
