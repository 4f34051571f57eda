"""`dynasearch models` and `dynasearch flops`: what the registry and a subnet cost."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from ..errors import SubnetError
from ..model.config import DIT_CONFIGS
from ._app import app, click_exc, console

ModelName = Enum("ModelName", {name: name for name in DIT_CONFIGS}, type=str)  # CLI choices from the registry


@app.command()
def models(
    input_size: int = typer.Option(32, help="Latent (or image) side length."),
    in_channels: int = typer.Option(4, help="Latent channels (4 for the SD VAE)."),
    num_classes: int = typer.Option(1000, help="Number of classes."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (for READMEs)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the registry with depth, width, heads, parameters and GFLOPs."""
    from ..cost.query import registry_rows

    rows = registry_rows(input_size, in_channels, num_classes)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    headers = ["model", "depth", "width", "heads", "patch", "tokens", "params (M)", "GFLOPs"]
    values = [
        [r["model"], r["depth"], r["hidden_size"], r["num_heads"], r["patch_size"], r["tokens"],
         f"{r['params'] / 1e6:.2f}", f"{r['gflops']:.2f}"]
        for r in rows
    ]
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" for _ in headers) + "|")
        for v in values:
            print("| " + " | ".join(str(x) for x in v) + " |")
        return
    table = Table(title=f"DiT registry at {input_size}x{input_size}x{in_channels}, {num_classes} classes (batch 1)")
    for h in headers:
        table.add_column(h, justify="left" if h == "model" else "right")
    for v in values:
        table.add_row(*(str(x) for x in v))
    console.print(table)


@app.command()
def flops(
    model: ModelName | None = typer.Option(None, help="Registry model (or use --checkpoint)."),
    checkpoint: Path | None = typer.Option(None, help="Count a saved supernet or sliced model instead."),
    input_size: int = typer.Option(32, help="Latent (or image) side length."),
    in_channels: int = typer.Option(4, help="Latent channels."),
    num_classes: int = typer.Option(1000, help="Number of classes."),
    subnet: Path | None = typer.Option(None, help="Subnet or timestep-schedule JSON file."),
    attn_rate: float | None = typer.Option(None, help="Uniform attention-head rate in (0, 1]."),
    mlp_rate: float | None = typer.Option(None, help="Uniform MLP-width rate in (0, 1]."),
    token_ratio: float | None = typer.Option(None, help="Uniform token ratio in (0, 1]."),
    batch: int = typer.Option(1, min=1, help="Batch size (classifier-free guidance doubles it)."),
    sample_steps: int = typer.Option(50, help="Timestep schedules: DDIM steps the mean FLOPs per step is taken over."),
    by_module: bool = typer.Option(False, "--by-module", help="Per-module table."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Count FLOPs (fvcore, with attention) and the closed form, and parameters, of a model or subnet."""
    from ..cost.query import FlopsQuery, run_flops_query

    if (model is None) == (checkpoint is None):
        raise click_exc.UsageError("give exactly one of --model or --checkpoint")
    rates = (attn_rate, mlp_rate, token_ratio)
    if subnet is not None and any(r is not None for r in rates):
        raise click_exc.UsageError("give either --subnet or the --attn-rate/--mlp-rate/--token-ratio options, not both")
    for name, value in zip(("--attn-rate", "--mlp-rate", "--token-ratio"), rates, strict=True):
        if value is not None and not 0.0 < value <= 1.0:
            raise SubnetError(f"{name} must be in (0, 1], got {value}")
    query = FlopsQuery(
        model=model.value if model is not None else None,
        checkpoint=checkpoint,
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        subnet_file=subnet,
        attn_rate=attn_rate,
        mlp_rate=mlp_rate,
        token_ratio=token_ratio,
        batch=batch,
        sample_steps=sample_steps,
    )
    result = run_flops_query(query)
    if as_json:
        print(json.dumps(result.to_dict(by_module), indent=2))
        return
    if result.schedule is not None:
        buckets = Table(title=f"{result.model}: timestep schedule, {sample_steps} DDIM steps")
        for h in ("bucket", "timesteps", "steps", "GFLOPs (fvcore)", "GFLOPs (closed form)", "subnet"):
            buckets.add_column(h, justify="left" if h in ("timesteps", "subnet") else "right")
        for r in result.bucket_rows:
            buckets.add_row(str(r["bucket"]), r["timesteps"], str(r["steps"]), f"{r['flops'] / 1e9:.4f}",
                            f"{r['flops_closed_form'] / 1e9:.4f}", r["subnet"])
        console.print(buckets)
    title = "mean per denoising step" if result.schedule is not None else result.subnet_description
    table = Table(title=f"{result.model}: {title}")
    for h in ("GFLOPs (fvcore)", "GFLOPs (closed form)", "params (M)", "batch"):
        table.add_column(h, justify="right")
    table.add_row(f"{result.gflops:.4f}", f"{result.gflops_closed_form:.4f}", f"{result.params / 1e6:.3f}", str(batch))
    console.print(table)
    if by_module:
        mods = Table(title="per module")
        for h in ("module", "GFLOPs (fvcore)", "GFLOPs (closed form)"):
            mods.add_column(h, justify="left" if h == "module" else "right")
        for name, (fv, cf) in result.module_rows().items():
            mods.add_row(name, f"{fv / 1e9:.4f}", f"{cf / 1e9:.4f}")
        console.print(mods)
