"""`dynasearch sample` and `dynasearch eval`: image grids from a checkpoint, and its generative quality."""

from __future__ import annotations

import json
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

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
    subnet: Optional[Path] = typer.Option(None, help="Subnet or timestep-schedule JSON file to run (supernets; timestep-dynamic checkpoints switch subnets per step by themselves)."),
    labels: Optional[str] = typer.Option(None, help="Classes, one grid row each: '0,1,2' or '0-9'."),
    num: Optional[int] = typer.Option(None, min=1, help="Number of samples, labels cycling over the classes."),
    per_label: int = typer.Option(8, min=1, help="Samples per label (the grid's columns) with --labels."),
    cfg_scale: float = typer.Option(DEFAULT_CFG_SCALE, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps."),
    sampler: Sampler = typer.Option(Sampler.ddim, help="Sampler."),
    seed: int = typer.Option(0, help="Random seed (same seed, same samples)."),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write (latent models: also OUT.npz)."),
    device: Device = typer.Option(Device.auto, help="Device."),
    vae: Optional[Path] = typer.Option(None, help="Local diffusers AutoencoderKL folder to decode latents."),
) -> None:
    """Sample class-conditional images from a checkpoint and write them as a grid."""
    from ..sampling import SampleConfig, parse_labels, run_sample

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
        out=out,
        device=device.value,
        vae=vae,
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


@app.command(name="eval")
def eval_(
    checkpoint: Path = typer.Option(..., help="Supernet, training run or sliced checkpoint directory."),
    subnet: Optional[Path] = typer.Option(None, help="Subnet or timestep-schedule JSON file to evaluate (supernets; timestep-dynamic checkpoints switch per step by themselves)."),
    num: int = typer.Option(1000, min=2, help="Generated samples (labels cycling over the classes)."),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps."),
    cfg_scale: float = typer.Option(DEFAULT_CFG_SCALE, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, help="Random seed."),
    sampler: Sampler = typer.Option(Sampler.ddim, help="Sampler."),
    device: Device = typer.Option(Device.auto, help="Device."),
    data: Optional[str] = typer.Option(None, help="The data it was trained on (digits | mnist | folder:PATH | npz:PATH), overriding its config.json's record."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Frechet distance to the data the model was trained on, in that data's classifier's features, and the class accuracy."""
    from ..quality import EvalConfig, run_eval

    config = EvalConfig(
        checkpoint=checkpoint, subnet_file=subnet, num=num, steps=steps, cfg_scale=cfg_scale, seed=seed,
        sampler=sampler.value, device=device.value, data=data,
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

    def pct(value: Optional[float]) -> str:
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
