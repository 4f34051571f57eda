"""`dynasearch report`: figures, tables and an HTML page for a search directory; `dynasearch compare`: models
measured side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from ..sampling import DEFAULT_CFG_SCALE, DEFAULT_STEPS
from ._app import app, console, err_console, print_frame
from ._sample import Device, Sampler, step_bar


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


@app.command()
def compare(
    model: list[str] = typer.Option(
        ..., metavar="<NAME=PATH>", help="NAME=PATH of a checkpoint directory (supernet, exported subnet or schedule); "
                                         "repeat for each model."
    ),
    seeds: str = typer.Option("0,1", help="Sampling seeds, comma-separated: every model is measured once per seed."),
    num: int = typer.Option(1000, min=2, help="Generated samples per model and seed."),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps."),
    cfg_scale: float = typer.Option(DEFAULT_CFG_SCALE, min=0.0, help="Classifier-free guidance scale (1 = off)."),
    sampler: Sampler = typer.Option(Sampler.ddim, help="Sampler."),
    device: Device = typer.Option(Device.cpu, help="Device."),
    data: str | None = typer.Option(None, help="The data every model was trained on, overriding their records."),
    out: Path | None = typer.Option(None, help="Directory for compare.csv, compare-summary.csv and compare.json."),
) -> None:
    """FLOPs, FD and class accuracy of several models side by side, the same settings and seeds for each."""
    from ..report.compare import (
        CompareConfig,
        compare_models,
        parse_model_spec,
        parse_seeds,
        write_comparison,
    )

    config = CompareConfig(
        models=tuple(parse_model_spec(m) for m in model), seeds=parse_seeds(seeds), num=num, steps=steps,
        cfg_scale=cfg_scale, sampler=sampler.value, device=device.value, data=data, out=out,
    )

    def status(message: str) -> None:
        err_console.print(message, highlight=False)

    with step_bar("sampling") as progress:
        result = compare_models(config, progress=progress, status=status)
    if out is not None:
        for path in write_comparison(result, out):
            console.print(f"wrote {path}", highlight=False)
    print_frame(result.summary, f"{result.record['reference']}; {num} samples per seed, seeds {seeds}")
