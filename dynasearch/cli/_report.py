"""`dynasearch report`: figures, tables and an HTML page for a search directory."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, console, print_frame


@app.command()
def report(
    results: Path = typer.Argument(..., help="A search output directory (holding trials.csv, pareto.csv, best.json)."),
    samples: bool = typer.Option(True, help="Draw sample grids of the exported subnets and the full model."),
    eval_num: int = typer.Option(500, help="Samples per model for FD and class accuracy (0 skips the metric)."),
    steps: int = typer.Option(50, help="DDIM steps for samples and the metric."),
    cfg_scale: float = typer.Option(4.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Sampling seed (the same for every model)."),
    latency_batch: int = typer.Option(8, help="Batch size of the latency measurement."),
) -> None:
    """Write pareto.png, widths.png, history.png, samples.png, report.html and report.md into RESULTS."""
    from ..report.build import ReportConfig, build_report

    if eval_num < 0 or steps < 1 or latency_batch < 1:
        raise typer.BadParameter("--eval-num must be >= 0, --steps and --latency-batch >= 1")
    config = ReportConfig(
        out=results, samples=samples, eval_num=eval_num, steps=steps, cfg_scale=cfg_scale, seed=seed,
        latency_batch=latency_batch,
    )
    with console.status("building the report") as status:
        result = build_report(config, status=lambda msg: status.update(msg))
    print_frame(result.models, "exported subnets and the full model")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"report: {results / 'report.html'}")
