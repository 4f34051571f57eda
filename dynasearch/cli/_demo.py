"""`dynasearch demo`: the one-command pipeline on the embedded digits set."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, console


@app.command()
def demo(
    out: Path = typer.Option(Path("results/demo"), help="Search results and report (CSV, JSON, PNG, HTML)."),
    run_dir: Path = typer.Option(Path("runs/demo"), help="The supernet training run (checkpoints)."),
    flops: str = typer.Option("0.5x", help="FLOPs budget of the search."),
    trials: int = typer.Option(120, help="Search trials."),
    eval_num: int = typer.Option(500, help="Samples per model for FD and class accuracy."),
    seed: int = typer.Option(0, help="Seed of every stage."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run of every stage (tiny model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace earlier demo outputs."),
) -> None:
    """Train a supernet on digits, search at 50% FLOPs, export, evaluate and write the report."""
    from ..demo import DemoConfig, run_demo

    config = DemoConfig(out=out, run_dir=run_dir, quick=quick, flops=flops, trials=trials, eval_num=eval_num,
                        seed=seed, overwrite=overwrite)
    result = run_demo(config, stage=lambda msg: console.print(f"[bold cyan]{msg}"))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"done ({timing}); report: {result.report}")
