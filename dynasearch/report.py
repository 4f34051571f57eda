"""`dynasearch report`: figures, tables and a self-contained HTML page (plus Markdown) for a search directory."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .checkpoint import atomic_write_text, load_checkpoint
from .errors import DynasearchError
from .latency import measure_latency
from .plots import plot_history, plot_pareto, plot_sample_rows, plot_widths
from .report_data import SearchTables, history, pareto_plot_data, read_search, width_map

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


def _measure(cfg: ReportConfig, t: SearchTables, status: StatusFn) -> tuple[pd.DataFrame, list[tuple[str, Any]], list[str]]:
    from .flops import closed_form_flops, closed_form_params
    from .sampling import cycle_labels, grid_array, sample_images

    notes: list[str] = []
    rows, grids, full_latency = [], [], None
    for name, path in _models(t):
        try:
            model = load_checkpoint(path)
        except DynasearchError as exc:
            notes.append(f"{name}: not measured ({exc})")
            continue
        if name == "full model":
            model.set_subnet(model.subnet.full(model.config))
        subnet = model.subnet
        flops = closed_form_flops(model.config, subnet)
        row: dict[str, Any] = {
            "model": name,
            "gflops": flops / 1e9,
            "% of full FLOPs": 100 * flops / (t.best["full_gflops"] * 1e9),
            "params (M)": closed_form_params(model.config, subnet) / 1e6,
        }
        status(f"timing {name}")
        latency = measure_latency(model, batch=cfg.latency_batch, repeats=cfg.latency_repeats)
        full_latency = latency if name == "full model" else full_latency
        row["latency (ms)"] = latency * 1e3
        row["latency ratio"] = latency / full_latency if full_latency else None
        if cfg.eval_num > 0 and model.config.in_channels == 1 and model.config.num_classes == 10:
            from .quality import evaluate_quality

            status(f"scoring {name} on {cfg.eval_num} samples")
            q = evaluate_quality(model, num=cfg.eval_num, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed)
            row["FD"] = q.fd
            row["class accuracy"] = q.class_accuracy
        if cfg.samples and model.config.in_channels in (1, 3):
            status(f"sampling {name}")
            labels = cycle_labels(model.config.num_classes, 4 * min(model.config.num_classes, 10))
            images = sample_images(model, labels, cfg_scale=cfg.cfg_scale, steps=cfg.steps, seed=cfg.seed)
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
    """Write pareto.png, widths.png, history.png, samples.png, report.html, report.md and report.json."""
    status = status or (lambda _m: None)
    t = read_search(cfg.out)
    out = cfg.out
    files = [
        plot_pareto(pareto_plot_data(t), out / "pareto.png"),
        plot_widths(width_map(t), out / "widths.png"),
        plot_history(history(t), out / "history.png"),
    ]
    models, grids, notes = _measure(cfg, t, status)
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
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    files.append(out / "report.json")
    best_line = _best_line(t)
    atomic_write_text(out / "report.html", _html(t, files, models, settings, best_line, summary["notes"]))
    atomic_write_text(out / "report.md", _markdown(t, files, models, settings, best_line))
    files += [out / "report.html", out / "report.md"]
    return ReportResult(files, models, summary["notes"])


def _best_line(t: SearchTables) -> str:
    b, u = t.best, t.best.get("best_uniform")
    line = (f"Best subnet within {b['budget_gflops']:.4g} GFLOPs: {b['gflops']:.4g} GFLOPs "
            f"({100 * b['gflops'] / b['full_gflops']:.1f}% of the full model), proxy loss {b['proxy_loss']:.5f}")
    if u:
        line += f"; best uniform subnet within budget: {u['gflops']:.4g} GFLOPs, proxy loss {u['proxy_loss']:.5f}"
    return line + "."


def _html(t: SearchTables, files: list[Path], models: pd.DataFrame, settings: dict, best: str, notes: list[str]) -> str:
    figures = "".join(f"<h2>{html.escape(p.stem)}</h2>{_img(p)}" for p in files if p.suffix == ".png")
    settings_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dynasearch report: {html.escape(t.out.name)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table.t,table.s{{border-collapse:collapse;margin:1em 0}}td,th{{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h1>dynasearch report: {html.escape(t.out.name)}</h1>
<p>{html.escape(best)}</p>
<h2>Exported subnets and the full model</h2>{_table(models)}
<p>Latency: median forward time, same process, batch as in the settings; FD and class accuracy from the digit
classifier's feature space (lower FD is better).</p>
<h2>Pareto front</h2>{_table(_pareto_table(t))}
{figures}
<h2>Search settings</h2><table class="s">{settings_rows}</table>
{f"<h2>Notes</h2><ul>{notes_html}</ul>" if notes else ""}
</body></html>
"""


def _markdown(t: SearchTables, files: list[Path], models: pd.DataFrame, settings: dict, best: str) -> str:
    def md(df: pd.DataFrame) -> str:
        cols = list(df.columns)
        lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
        for _, r in df.iterrows():
            lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
        return "\n".join(lines)

    figures = "\n\n".join(f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png")
    settings_md = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    return (f"# dynasearch report: {t.out.name}\n\n{best}\n\n## Exported subnets and the full model\n\n{md(models)}\n\n"
            f"## Pareto front\n\n{md(_pareto_table(t))}\n\n{figures}\n\n## Search settings\n\n{settings_md}\n")
