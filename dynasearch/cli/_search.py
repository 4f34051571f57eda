"""`dynasearch search`: FLOPs-budgeted Optuna search over a trained supernet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ._app import app, console, stop

if TYPE_CHECKING:
    from ..search.config import SearchConfig
    from ..search.outputs import SearchResult
    from ..search.timestep import TimestepSearchResult


@app.command()
def search(
    supernet: Path = typer.Option(..., help="Supernet: a training run directory (or a supernet checkpoint)."),
    flops: str | None = typer.Option(None, help="FLOPs budget: 50G, 50GFLOPs, 5e10, 500M, 0.5x or 50% (this "
                                                "and/or --latency)."),
    latency: str | None = typer.Option(None, help="Latency budget: 40ms, 0.04s or 40 (ms), on --latency-table's "
                                                  "prediction at the table's batch and device."),
    latency_table: Path | None = typer.Option(None, help="Latency table of 'dynasearch bench latency-table' "
                                                         "for the supernet's model (needed by --latency)."),
    space: str | None = typer.Option(
        None, help="Search space: shipped name or YAML file (default: the training space)."
    ),
    trials: int = typer.Option(200, help="Finished trials the study should hold (a rerun resumes up to this)."),
    sampler: str = typer.Option("tpe", help="tpe, nsga2, gp or random."),
    storage: str | None = typer.Option(None, help="Optuna storage: RDB URL (postgresql://...) or journal file path."),
    study_name: str = typer.Option("dynasearch", help="Study name inside the storage."),
    workers: int = typer.Option(1, help="Worker processes on this machine."),
    seed: int = typer.Option(0, help="Sampler seed and proxy-set seed."),
    export_top: int = typer.Option(3, help="Pareto points to export as sliced checkpoints (besides the best)."),
    proxy_samples: int = typer.Option(512, help="Validation quadruples in the quality proxy."),
    proxy: str = typer.Option(  # the default is search.proxy.DEFAULT_PROXY (tests/test_proxy.py checks they agree)
        "teacher", help="Quality proxy: eps (epsilon MSE), teacher (MSE to the full model's prediction), teacher-norm "
        "(the same per timestep bin, in units of the full model's own error), teacher-sample (8-step DDIM samples "
        "against the full model's; static spaces only).",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    out: Path = typer.Option(Path("results/search"), help="Output directory."),
    sample_steps: int = typer.Option(
        50, help="Timestep-aware spaces: DDIM steps the mean FLOPs per step is taken over."
    ),
    reference: Path | None = typer.Option(
        None, help="Timestep-aware spaces: a static subnet (e.g. a static search's best.json) to compare against."
    ),
) -> None:
    """Search per-block heads, MLP widths and token ratios under a FLOPs budget; export the best subnets.

    With a timestep-aware space (timestep_buckets) every range of timesteps gets its own subnet: per-bucket
    studies and an exact knapsack, and a joint study, compared with the best static subnets.
    """
    from ..search.config import SearchConfig, TimestepSettings
    from ..search.run import run_search
    from ..search.timestep import TimestepSearchResult
    from ..search.trials import SearchInterrupted

    config = SearchConfig(
        supernet=supernet, flops=flops, out=out, space=space, trials=trials, sampler=sampler, storage=storage,
        study_name=study_name, workers=workers, seed=seed, export_top=export_top, proxy_samples=proxy_samples,
        proxy=proxy, device=device, latency=latency, latency_table=latency_table,
        timestep=TimestepSettings(sample_steps=sample_steps, reference=reference),
    )
    try:
        result = run_search(config)
    except SearchInterrupted as stopped:
        message = (
            f"interrupted after {stopped.finished} trials (of {stopped.target}); "
            f"resume with: {resume_command(config)} (same --out)"
        )
        raise stop(message, 130) from None
    if isinstance(result, TimestepSearchResult):
        _print_schedules(result)
    else:
        _print_pareto(result)


def _print_pareto(result: SearchResult) -> None:
    """Print a static search's notes, Pareto front, best subnet and exports."""
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    table = Table(title=f"Pareto front ({len(result.pareto)} subnets within {result.best['budget_gflops']:.4f} GFLOPs)")
    for h in ("trial", "GFLOPs", "% of full", "proxy loss"):
        table.add_column(h, justify="right")
    full = result.best["full_gflops"]
    for _, row in result.pareto.iterrows():
        table.add_row(str(int(row["number"])), f"{row['gflops']:.4f}", f"{100 * row['gflops'] / full:.1f}",
                      f"{row['proxy_loss']:.5f}")
    console.print(table)
    best = result.best
    line = f"best within budget: {best['gflops']:.4f} GFLOPs, proxy loss {best['proxy_loss']:.5f}"
    if best.get("best_uniform"):
        u = best["best_uniform"]
        line += f"; best uniform: {u['gflops']:.4f} GFLOPs, proxy loss {u['proxy_loss']:.5f}"
    console.print(line)
    for e in result.exported:
        console.print(f"exported {e['name']}: {e['gflops']:.4f} GFLOPs, {e['params'] / 1e6:.3f}M params -> {e['path']}")
        if "predicted_latency_ms" in e:
            measured = e.get("measured_latency_ms")
            console.print(f"  latency {e['predicted_latency_ms']:.2f} ms predicted, "
                          + ("not measured" if measured is None else f"{measured:.2f} ms measured")
                          + f" (budget {best['latency_budget_ms']:.2f} ms)", highlight=False)
    console.print(f"results in {result.out}")


def _print_schedules(result: TimestepSearchResult) -> None:
    """Print a timestep-aware search's notes, the schedules it compared and their exports."""
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    best = result.best
    title = (f"Schedules within {best['budget_gflops']:.4g} GFLOPs per step (mean over {best['sample_steps']} DDIM "
             f"steps, {'/'.join(str(c) for c in best['steps_per_bucket'])} per bucket)")
    timed = "mean_latency_ms" in result.comparison
    if timed:
        title += f", {best['latency_budget_ms']:.4g} ms per step predicted"
    table = Table(title=title)
    heads = ("method", "mean GFLOPs", "% of full", *(("ms predicted", "ms measured") if timed else ()), "proxy loss",
             "within budget", "")
    for h in heads:
        table.add_column(h, justify="left" if h in ("method", "") else "right")
    for _, row in result.comparison.iterrows():
        ms = ()
        if timed:
            measured = row.get("measured_latency_ms")
            ms = (f"{row['mean_latency_ms']:.4g}",
                  "-" if measured is None or measured != measured else f"{measured:.4g}")
        table.add_row(str(row["method"]), f"{row['mean_gflops']:.4g}", f"{100 * row['flops_ratio']:.1f}", *ms,
                      f"{row['proxy_loss']:.5f}", "yes" if row["within_budget"] else "no",
                      "winner" if row["winner"] else "")
    console.print(table)
    for e in result.exported:
        console.print(f"exported {e['name']}: {e['mean_gflops']:.4g} GFLOPs per step, {e['params'] / 1e6:.3f}M params "
                      f"-> {e['path']}")
    console.print(f"results in {result.out} (schedule.json: the winning schedule)")


def resume_command(config: SearchConfig) -> str:
    """The `dynasearch search` command line that resumes `config`'s study (storage password masked)."""
    import shlex
    from dataclasses import fields

    from ..search.config import SearchConfig, TimestepSettings, is_timestep_space
    from ..search.storage import mask_url

    parts = ["dynasearch", "search"]
    for f in fields(SearchConfig):
        value = getattr(config, f.name)
        if f.name == "timestep" or value is None or (f.name not in ("supernet", "flops", "out") and value == f.default):
            continue
        text = mask_url(str(value)) if f.name == "storage" else str(value)
        parts += [f"--{f.name.replace('_', '-')}", shlex.quote(text)]
    command = " ".join(parts)
    if is_timestep_space(config):  # the options only the timestep-aware search reads
        settings = config.timestep
        command += (f" --sample-steps {settings.sample_steps}"
                    if settings.sample_steps != TimestepSettings.sample_steps else "")
        command += f" --reference {settings.reference}" if settings.reference is not None else ""
    return command
