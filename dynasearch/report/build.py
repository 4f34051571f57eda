"""`dynasearch report`: figures, tables and a self-contained HTML page (plus Markdown) for a search directory."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..checkpoint.native import load_checkpoint, read_config, read_schedule
from ..cost.flops import mean_flops
from ..cost.latency import measure_latency
from ..diffusion.factory import diffusion_for
from ..errors import DynasearchError
from ..fileio import atomic_write_text
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from ..model.subnet import Subnet
from .data import (
    SearchTables,
    TimestepTables,
    bucket_fronts,
    bucket_width_map,
    history,
    is_timestep_search,
    pareto_plot_data,
    read_search,
    read_timestep_search,
    width_map,
)
from .plots import (
    plot_bucket_fronts,
    plot_bucket_widths,
    plot_history,
    plot_pareto,
    plot_sample_rows,
    plot_widths,
)

__all__ = ["ReportConfig", "ReportResult", "build_report"]

StatusFn = Callable[[str], None]


@dataclass(frozen=True)
class ReportConfig:
    """What `dynasearch report` does: which extras to measure (samples, metric, latency) and how much."""

    out: Path
    samples: bool = True
    eval_num: int = 500
    steps: int = 50
    cfg_scale: float = 4.0
    seed: int = 0
    latency_batch: int = 8
    latency_repeats: int = 10


@dataclass
class ReportResult:
    """Files written and the per-model table."""

    files: list[Path]
    models: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _models(t: SearchTables) -> list[tuple[str, Path | None]]:
    """('full model', supernet dir) followed by every exported subnet directory."""
    entries: list[tuple[str, Path | None]] = [("full model", Path(t.best["settings"]["supernet"]))]
    sub = t.out / "subnets"
    if sub.is_dir():
        entries += [(p.name, p) for p in sorted(sub.iterdir()) if (p / "config.json").is_file()]
    return entries


def _schedule_models(t: TimestepTables) -> list[tuple[str, Path | None]]:
    """('full model', supernet dir) followed by every exported timestep-dynamic checkpoint."""
    entries: list[tuple[str, Path | None]] = [("full model", Path(t.best["settings"]["supernet"]))]
    sub = t.out / "schedules"
    if sub.is_dir():
        entries += [(p.name, p) for p in sorted(sub.iterdir()) if (p / "config.json").is_file()]
    return entries


def _latency(model: DiT, schedule: SubnetSchedule | None, cfg: ReportConfig) -> float:
    """Median forward seconds; for a schedule, the mean over a `cfg.steps` DDIM run of its buckets' latencies."""
    if schedule is None:
        return measure_latency(model, batch=cfg.latency_batch, repeats=cfg.latency_repeats)
    counts = schedule.buckets.step_counts(diffusion_for(model.config).timestep_schedule(cfg.steps))
    per_bucket = [measure_latency(model, batch=cfg.latency_batch, subnet=s, repeats=cfg.latency_repeats) if n else 0.0
                  for s, n in zip(schedule.subnets, counts)]
    return sum(n * v for n, v in zip(counts, per_bucket)) / sum(counts)


def _measure(
    cfg: ReportConfig, entries: list[tuple[str, Path | None]], full_gflops: float, status: StatusFn,
    flops_steps: int | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, Any]], list[str]]:
    """FLOPs, parameters, latency, FD / class accuracy and a sample grid of every model (schedules switch per step).

    A schedule's FLOPs are its mean per step over a `flops_steps` DDIM run (default: the report's `steps`).
    """
    from ..cost.flops import closed_form_flops, closed_form_params
    from ..sampling import cycle_labels, grid_array, sample_images

    notes: list[str] = []
    rows, grids, full_latency = [], [], None
    for name, path in entries:
        try:
            model = load_checkpoint(path)
            schedule = read_schedule(read_config(path), model.config, path)
        except DynasearchError as exc:
            notes.append(f"{name}: not measured ({exc})")
            continue
        if name == "full model":
            model.set_subnet(Subnet.full(model.config))
            schedule = None
        run: Subnet | SubnetSchedule = schedule if schedule is not None else model.subnet
        if schedule is not None:
            timesteps = diffusion_for(model.config).timestep_schedule(flops_steps or cfg.steps)
            flops = mean_flops(schedule, model.config, timesteps)
        else:
            flops = closed_form_flops(model.config, model.subnet)
        row: dict[str, Any] = {
            "model": name,
            "gflops": flops / 1e9,
            "% of full FLOPs": 100 * flops / (full_gflops * 1e9),
            "params (M)": closed_form_params(model.config) / 1e6,
        }
        status(f"timing {name}")
        latency = _latency(model, schedule, cfg)
        full_latency = latency if name == "full model" else full_latency
        row["latency (ms)"] = latency * 1e3
        row["latency ratio"] = latency / full_latency if full_latency else None
        if cfg.eval_num > 0 and model.config.in_channels == 1 and model.config.num_classes == 10:
            from ..quality import evaluate_quality

            status(f"scoring {name} on {cfg.eval_num} samples")
            q = evaluate_quality(model, num=cfg.eval_num, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed, subnet=run)
            row["FD"] = q.fd
            row["class accuracy"] = q.class_accuracy
        if cfg.samples and model.config.in_channels in (1, 3):
            status(f"sampling {name}")
            labels = cycle_labels(model.config.num_classes, 4 * min(model.config.num_classes, 10))
            images = sample_images(model, labels, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed, subnet=run)
            grids.append((f"{name}\n{row['gflops']:.3g} GFLOPs", grid_array(images, nrow=min(model.config.num_classes, 10))))
        rows.append(row)
    return pd.DataFrame(rows), grids, notes


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}" style="max-width:100%">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def _pareto_table(t: SearchTables) -> pd.DataFrame:
    cols = [c for c in ("number", "gflops", "proxy_loss") if c in t.pareto.columns]
    df = t.pareto[cols].copy()
    df["% of full"] = 100 * df["gflops"] / t.best["full_gflops"]
    return df


def build_report(cfg: ReportConfig, status: StatusFn | None = None) -> ReportResult:
    """Write the figures, report.html, report.md and report.json of a static or timestep-aware search directory."""
    status = status or (lambda _m: None)
    if is_timestep_search(cfg.out):
        return _timestep_report(cfg, status)
    t = read_search(cfg.out)
    out = cfg.out
    files = [
        plot_pareto(pareto_plot_data(t), out / "pareto.png"),
        plot_widths(width_map(t), out / "widths.png"),
        plot_history(history(t), out / "history.png"),
    ]
    models, grids, notes = _measure(cfg, _models(t), t.best["full_gflops"], status)
    if grids:
        files.append(plot_sample_rows(grids, out / "samples.png"))
    settings = {k: v for k, v in t.best.get("settings", {}).items() if k != "space"}
    summary = {
        "budget_gflops": t.best["budget_gflops"],
        "full_gflops": t.best["full_gflops"],
        "best": {k: t.best.get(k) for k in ("trial", "gflops", "proxy_loss")},
        "best_uniform": t.best.get("best_uniform"),
        "models": json.loads(models.to_json(orient="records")),
        "settings": settings,
        "notes": notes + t.best.get("notes", []),
    }
    tables = [("Exported subnets and the full model", models), ("Pareto front", _pareto_table(t))]
    return _write_pages(out, files, summary, _best_line(t), tables)


def _timestep_report(cfg: ReportConfig, status: StatusFn) -> ReportResult:
    """The report of a timestep-aware search: bucket fronts, width maps with a bucket axis, the comparison."""
    t = read_timestep_search(cfg.out)
    out, b = cfg.out, t.best
    files = [plot_bucket_fronts(bucket_fronts(t), out / "buckets.png"), plot_bucket_widths(bucket_width_map(t), out / "widths.png")]
    steps = int(b.get("sample_steps") or cfg.steps)
    models, grids, notes = _measure(cfg, _schedule_models(t), b["full_gflops"], status, flops_steps=steps)
    if steps != cfg.steps:
        notes.append(f"FLOPs are means over the search's {steps} DDIM steps; samples and metrics used {cfg.steps} steps")
    if grids:
        files.append(plot_sample_rows(grids, out / "samples.png"))
    comparison = t.comparison.drop(columns=["schedule", "static"], errors="ignore").copy()
    comparison["flops_ratio"] = 100 * comparison["flops_ratio"]
    comparison = comparison.rename(columns={"flops_ratio": "% of full FLOPs"})
    settings = {k: v for k, v in b.get("settings", {}).items() if k != "space"}
    summary = {
        "budget_gflops": b["budget_gflops"], "full_gflops": b["full_gflops"], "sample_steps": b.get("sample_steps"),
        "best": {k: b.get(k) for k in ("method", "mean_gflops", "flops_ratio", "proxy_loss")},
        "comparison": json.loads(comparison.to_json(orient="records")),
        "models": json.loads(models.to_json(orient="records")), "settings": settings, "notes": notes + b.get("notes", []),
    }
    static = t.comparison[t.comparison["method"].str.startswith("static")]
    headline = (f"Timestep-aware schedule ({b['method']}): {b['mean_gflops']:.4g} GFLOPs per step on average over "
                f"{b.get('sample_steps')} DDIM steps ({100 * b['flops_ratio']:.1f}% of the full model), proxy loss "
                f"{b['proxy_loss']:.5f}")
    if not static.empty:
        s = static.sort_values("proxy_loss").iloc[0]
        headline += f"; best static subnet ({s['method']}): {s['mean_gflops']:.4g} GFLOPs, proxy loss {s['proxy_loss']:.5f}"
    tables = [("Schedules compared (same supernet, same proxy set)", comparison),
              ("Exported schedules and the full model", models)]
    return _write_pages(out, files, summary, headline + ".", tables)


def _write_pages(
    out: Path, files: list[Path], summary: dict[str, Any], headline: str, tables: list[tuple[str, pd.DataFrame]]
) -> ReportResult:
    """report.json, report.html (self-contained) and report.md from the figures, tables and summary."""
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    files.append(out / "report.json")
    atomic_write_text(out / "report.html", _html(out, files, tables, summary["settings"], headline, summary["notes"]))
    atomic_write_text(out / "report.md", _markdown(out, files, tables, summary["settings"], headline))
    files += [out / "report.html", out / "report.md"]
    models = next((df for title, df in tables if "full model" in title), pd.DataFrame())
    return ReportResult(files, models, summary["notes"])


def _best_line(t: SearchTables) -> str:
    b, u = t.best, t.best.get("best_uniform")
    line = (f"Best subnet within {b['budget_gflops']:.4g} GFLOPs: {b['gflops']:.4g} GFLOPs "
            f"({100 * b['gflops'] / b['full_gflops']:.1f}% of the full model), proxy loss {b['proxy_loss']:.5f}")
    if u:
        line += f"; best uniform subnet within budget: {u['gflops']:.4g} GFLOPs, proxy loss {u['proxy_loss']:.5f}"
    return line + "."


_NOTE = ("Latency: median forward time, same process, batch as in the settings (a schedule: the mean over its "
         "sampling steps); FD and class accuracy from the digit classifier's feature space (lower FD is better).")


def _html(out: Path, files: list[Path], tables: list[tuple[str, pd.DataFrame]], settings: dict, best: str, notes: list[str]) -> str:
    figures = "".join(f"<h2>{html.escape(p.stem)}</h2>{_img(p)}" for p in files if p.suffix == ".png")
    sections = "".join(f"<h2>{html.escape(title)}</h2>{_table(df)}" for title, df in tables)
    settings_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dynasearch report: {html.escape(out.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.t,table.s{{border-collapse:collapse;margin:1em 0}}td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h1>dynasearch report: {html.escape(out.name)}</h1>
<p>{html.escape(best)}</p>
{sections}
<p>{html.escape(_NOTE)}</p>
{figures}
<h2>Search settings</h2><table class="s">{settings_rows}</table>
{f"<h2>Notes</h2><ul>{notes_html}</ul>" if notes else ""}
</body></html>
"""


def _markdown(out: Path, files: list[Path], tables: list[tuple[str, pd.DataFrame]], settings: dict, best: str) -> str:
    def md(df: pd.DataFrame) -> str:
        cols = list(df.columns)
        lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
        for _, r in df.iterrows():
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
        return "\n".join(lines)

    figures = "\n\n".join(f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png")
    sections = "".join(f"## {title}\n\n{md(df)}\n\n" for title, df in tables)
    settings_md = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    return f"# dynasearch report: {out.name}\n\n{best}\n\n{sections}{figures}\n\n## Search settings\n\n{settings_md}\n"
