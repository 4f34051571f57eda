"""The report's pages: report.json, a self-contained report.html (figures inlined) and report.md, written from
the figures, the tables, the summary and a headline."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..fileio import atomic_write_text

__all__ = ["write_pages"]

_NOTE = ("Latency: median forward time, same process, batch as in the settings (a schedule: the mean over its "
         "sampling steps); FD and class accuracy in the training data's classifier's feature space (see the notes; "
         "lower FD is better).")


def write_pages(
    out: Path, files: list[Path], summary: dict[str, Any], headline: str, tables: list[tuple[str, pd.DataFrame]]
) -> list[Path]:
    """report.json, report.html (self-contained) and report.md from the figures, tables and summary; returns
    `files` with the three pages added."""
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    files = [*files, out / "report.json"]
    atomic_write_text(out / "report.html", _html(out, files, tables, summary["settings"], headline, summary["notes"]))
    atomic_write_text(out / "report.md", _markdown(out, files, tables, summary["settings"], headline))
    return [*files, out / "report.html", out / "report.md"]


def _img(path: Path) -> str:
    """An <img> tag with the PNG inlined as base64."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}" style="max-width:100%">'


def _html_table(df: pd.DataFrame) -> str:
    """A table as HTML, floats to 4 significant digits."""
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def _markdown_table(df: pd.DataFrame) -> str:
    """A table as Markdown, floats to 4 significant digits."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def _html(
    out: Path, files: list[Path], tables: list[tuple[str, pd.DataFrame]], settings: dict, best: str, notes: list[str]
) -> str:
    """The HTML page: headline, tables, the note on the measurements, figures, settings and notes."""
    figures = "".join(f"<h2>{html.escape(p.stem)}</h2>{_img(p)}" for p in files if p.suffix == ".png")
    sections = "".join(f"<h2>{html.escape(title)}</h2>{_html_table(df)}" for title, df in tables)
    settings_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                            for k, v in settings.items())
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
"""  # noqa: E501 - an HTML template, written out verbatim: its CSS line is longer than 120


def _markdown(out: Path, files: list[Path], tables: list[tuple[str, pd.DataFrame]], settings: dict, best: str) -> str:
    """The Markdown page: headline, tables, figures (linked) and settings."""
    figures = "\n\n".join(f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png")
    sections = "".join(f"## {title}\n\n{_markdown_table(df)}\n\n" for title, df in tables)
    settings_md = "\n".join(f"- {k}: {v}" for k, v in settings.items())
    return f"# dynasearch report: {out.name}\n\n{best}\n\n{sections}{figures}\n\n## Search settings\n\n{settings_md}\n"
