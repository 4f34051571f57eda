"""`dynasearch export`: a checkpoint as a diffusers DiTTransformer2DModel folder (or a DiT / diffusers model as
ours)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ._app import app, console


class ExportFormat(str, Enum):
    """What `export` writes."""

    diffusers = "diffusers"
    dynasearch = "dynasearch"


@app.command()
def export(
    checkpoint: Path = typer.Option(
        ..., help="A dynasearch checkpoint (supernet run or sliced subnet), a DiT .pt[#ema|#model] or a diffusers "
                  "folder."
    ),
    fmt: ExportFormat = typer.Option(
        ExportFormat.diffusers, "--format", help="diffusers (DiTTransformer2DModel) or dynasearch."
    ),
    out: Path = typer.Option(..., help="Output directory (written whole or not at all)."),
    pad: bool = typer.Option(
        False, "--pad", help="diffusers: write a subnet narrower than the full model zero-padded to full width (same "
                             "outputs)."
    ),
    allow_time_shift: bool = typer.Option(
        False, "--allow-time-shift",
        help="diffusers: write a model with DiT's timestep shift 0 although diffusers runs it with 1 (its outputs then "
             "differ).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out."),
) -> None:
    """Write a checkpoint in another format: a full-width model or a subnet with token ratio 1 as a diffusers folder
    that DiTTransformer2DModel.from_pretrained loads with the same outputs."""
    from ..checkpoint.export import ExportConfig, export_checkpoint

    result = export_checkpoint(
        ExportConfig(
            checkpoint=str(checkpoint),
            out=str(out),
            format=fmt.value,
            pad=pad,
            allow_time_shift=allow_time_shift,
            overwrite=overwrite,
        )
    )
    what = "diffusers DiTTransformer2DModel folder" if result.format == "diffusers" else "dynasearch checkpoint"
    padded = ", zero-padded to full width" if result.padded else ""
    console.print(
        f"wrote {what} {result.out} ({result.model}, {result.weights_bytes / 1e6:.1f} MB of weights{padded})",
        highlight=False,
    )
