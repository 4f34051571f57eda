"""`dynasearch report`: the report of a static or timestep-aware search directory, from its tables (:mod:`.data`),
its figures (:mod:`.plots`), the measured models (:mod:`.measure`) and the pages written (:mod:`.pages`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..fileio import kept_on_failure
from ..quality import StatusFn
from .data import (
    SearchTables,
    TimestepTables,
    bucket_fronts,
    bucket_width_map,
    comparison_table,
    has_latency,
    history,
    is_timestep_output,
    latency_plot_data,
    pareto_plot_data,
    pareto_table,
    proxy_axis_label,
    read_search,
    read_timestep_search,
    width_map,
)
from .measure import Measurements, ReportConfig, exported_models, measure_models
from .pages import write_pages
from .plots import (
    plot_bucket_fronts,
    plot_bucket_widths,
    plot_history,
    plot_pareto,
    plot_sample_rows,
    plot_widths,
)

__all__ = ["ReportConfig", "ReportResult", "build_report"]


@dataclass
class ReportResult:
    """Files written and the per-model table."""

    files: list[Path]
    models: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def build_report(cfg: ReportConfig, status: StatusFn | None = None) -> ReportResult:
    """Write the figures, report.html, report.md and report.json of a static or timestep-aware search directory."""
    status = status or (lambda _m: None)
    with kept_on_failure(cfg.out):  # a report that fails (a full disk) leaves the previous one as it was
        if is_timestep_output(cfg.out):
            return _timestep_report(cfg, status)
        return _static_report(cfg, status)


def _static_report(cfg: ReportConfig, status: StatusFn) -> ReportResult:
    """The report of a static search: Pareto plot, width map, history, the exported subnets measured."""
    t = read_search(cfg.out)
    out, b = cfg.out, t.best
    data = (pareto_plot_data(t), width_map(t), history(t))
    # measured first: a model that cannot be measured fails the report before any file is written
    measured = measure_models(cfg, exported_models(out, b, "subnets"), b["full_gflops"], status)
    files = [
        plot_pareto(data[0], out / "pareto.png"),
        plot_widths(data[1], out / "widths.png"),
        plot_history(data[2], out / "history.png"),
    ]
    if has_latency(t):  # a latency budget: the front against predicted latency, the exports at measured latency
        files.insert(1, plot_pareto(latency_plot_data(t), out / "pareto_latency.png",
                                    title="Search: proxy loss against predicted latency"))
    head = {
        "budget_gflops": b["budget_gflops"],
        "full_gflops": b["full_gflops"],
        "best": {k: b.get(k) for k in ("trial", "gflops", "proxy_loss")},
        "best_uniform": b.get("best_uniform"),
    }
    tables = [("Exported subnets and the full model", measured.models), ("Pareto front", pareto_table(t))]
    if has_latency(t):
        head["latency_budget_ms"] = b["latency_budget_ms"]
        head["exported_latency"] = b.get("exported_latency", [])
        tables.insert(1, ("Latency of the exported subnets (predicted by the table, measured sliced)",
                          pd.DataFrame(b.get("exported_latency", []))))
    return _finish(out, files, measured, b, head, _static_headline(t), tables)


def _timestep_report(cfg: ReportConfig, status: StatusFn) -> ReportResult:
    """The report of a timestep-aware search: bucket fronts, width maps with a bucket axis, the comparison."""
    t = read_timestep_search(cfg.out)
    out, b = cfg.out, t.best
    fronts, widths = bucket_fronts(t), bucket_width_map(t)
    steps = int(b.get("sample_steps") or cfg.steps)
    # measured first: a model that cannot be measured fails the report before any file is written
    measured = measure_models(cfg, exported_models(out, b, "schedules"), b["full_gflops"], status, flops_steps=steps)
    files = [plot_bucket_fronts(fronts, out / "buckets.png"), plot_bucket_widths(widths, out / "widths.png")]
    if steps != cfg.steps:
        measured.notes.append(f"FLOPs are means over the search's {steps} DDIM steps; samples and metrics used "
                              f"{cfg.steps} steps")
    comparison = comparison_table(t)
    head = {
        "budget_gflops": b["budget_gflops"], "full_gflops": b["full_gflops"], "sample_steps": b.get("sample_steps"),
        "best": {k: b.get(k) for k in ("method", "mean_gflops", "flops_ratio", "proxy_loss")},
        "comparison": json.loads(comparison.to_json(orient="records")),
    }
    tables = [("Schedules compared (same supernet, same proxy set)", comparison),
              ("Exported schedules and the full model", measured.models)]
    return _finish(out, files, measured, b, head, _timestep_headline(t), tables)


def _finish(
    out: Path, files: list[Path], measured: Measurements, best: dict[str, Any], head: dict[str, Any], headline: str,
    tables: list[tuple[str, pd.DataFrame]],
) -> ReportResult:
    """The sample figure, then report.json (`head`, the models, the settings, the notes), report.html and report.md."""
    if measured.grids:
        files = [*files, plot_sample_rows(measured.grids, out / "samples.png")]
    summary = {
        **head,
        "models": json.loads(measured.models.to_json(orient="records")),
        "settings": {k: v for k, v in best.get("settings", {}).items() if k != "space"},
        "notes": measured.notes + best.get("notes", []),
    }
    return ReportResult(write_pages(out, files, summary, headline, tables), measured.models, summary["notes"])


def _static_headline(t: SearchTables) -> str:
    """The best subnet within the budget and the best uniform one, in a sentence."""
    b, u = t.best, t.best.get("best_uniform")
    line = (f"Best subnet within {b['budget_gflops']:.4g} GFLOPs: {b['gflops']:.4g} GFLOPs "
            f"({100 * b['gflops'] / b['full_gflops']:.1f}% of the full model), proxy loss {b['proxy_loss']:.5f}")
    if u:
        line += f"; best uniform subnet within budget: {u['gflops']:.4g} GFLOPs, proxy loss {u['proxy_loss']:.5f}"
    return f"{line} ({proxy_axis_label(b)})."


def _timestep_headline(t: TimestepTables) -> str:
    """The chosen schedule against the best static subnet, in a sentence."""
    b = t.best
    static = t.comparison[t.comparison["method"].str.startswith("static")]
    headline = (f"Timestep-aware schedule ({b['method']}): {b['mean_gflops']:.4g} GFLOPs per step on average over "
                f"{b.get('sample_steps')} DDIM steps ({100 * b['flops_ratio']:.1f}% of the full model), proxy loss "
                f"{b['proxy_loss']:.5f}")
    if not static.empty:
        s = static.sort_values("proxy_loss").iloc[0]
        headline += (f"; best static subnet ({s['method']}): {s['mean_gflops']:.4g} GFLOPs, proxy loss "
                     f"{s['proxy_loss']:.5f}")
    return f"{headline} ({proxy_axis_label(b)})."
