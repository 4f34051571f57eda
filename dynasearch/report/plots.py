"""The report's figures (matplotlib, Agg): Pareto plot, width maps, history, sample rows and the timestep-aware
search's bucket fronts and bucket width maps, and `compare`'s FD against FLOPs; what they show comes from
:mod:`dynasearch.report.data`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..fileio import atomic_output
from .data import BucketFronts, BucketWidthMap, History, ParetoPlotData, WidthMap

__all__ = [
    "plot_bucket_fronts",
    "plot_bucket_widths",
    "plot_comparison",
    "plot_history",
    "plot_pareto",
    "plot_sample_rows",
    "plot_widths",
]

_METHOD_STYLE = {  # marker and colour of each schedule in the timestep figures
    "knapsack": ("o", "#c0392b"), "joint": ("s", "#2e8b57"), "static uniform": ("x", "#e08b3a"),
    "static reference": ("^", "#6a3d9a"),
}


def _save(fig: plt.Figure, path: Path, tight_box: bool = False) -> Path:
    """Write the figure (tight layout, or a tight bounding box for figures with a suptitle above) and close it."""
    try:
        if not tight_box:
            fig.tight_layout()
        with atomic_output(path) as tmp:  # a reader (or a full disk) never sees half a PNG
            fig.savefig(tmp, dpi=120, format="png", **({"bbox_inches": "tight"} if tight_box else {}))
    finally:
        plt.close(fig)
    return path


def plot_pareto(d: ParetoPlotData, path: Path, title: str = "Search: proxy loss against FLOPs") -> Path:
    """Every trial, the Pareto front, the uniform baseline, the budget line and the full model."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    g, loss, feasible = d.trials
    ax.scatter(g[~feasible], loss[~feasible], s=12, c="#bbbbbb", label="trials over budget")
    ax.scatter(g[feasible], loss[feasible], s=12, c="#7aa6d6", label="trials within budget")
    ax.scatter(*d.baseline, s=14, marker="x", c="#e08b3a", alpha=0.6, label="uniform subnets")
    ax.step(*d.baseline_front, where="post", c="#e08b3a", lw=1.2, label="uniform front")
    ax.step(*d.front, where="post", c="#1f4e8c", lw=2, label="searched Pareto front")
    ax.axvline(d.budget_gflops, c="#c0392b", ls="--", lw=1, label=f"budget {d.budget_gflops:.3g} {d.unit}")
    if d.full[1] is not None:
        ax.scatter([d.full[0]], [d.full[1]], marker="*", s=140, c="black", label="full model", zorder=5)
    ax.scatter([d.best[0]], [d.best[1]], marker="o", s=90, facecolors="none", edgecolors="#c0392b", lw=2,
               label="best within budget", zorder=6)
    if d.measured is not None:
        ax.scatter(*d.measured, marker="D", s=36, c="#2e8b57", label="exported, measured latency", zorder=7)
    ax.set_xlabel("GFLOPs (fvcore convention, batch 1)" if d.unit == "GFLOPs" else
                  f"latency ({d.unit}, predicted by the latency table)")
    ax.set_ylabel(d.y_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_widths(w: WidthMap, path: Path) -> Path:
    """Heat maps of heads, MLP width and token ratio per block (columns) for each Pareto subnet (rows)."""
    rows = max(1, len(w.labels))
    fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.28 * rows), sharey=True)
    for ax, data, name in zip(axes, (w.attn, w.mlp, w.tokens), ("attention heads", "MLP width", "token ratio"),
                              strict=True):
        im = ax.imshow(data if data.size else np.zeros((1, 1)), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_xlabel("block")
        if data.size:
            ax.set_xticks(range(data.shape[1]))
    if w.labels:
        axes[0].set_yticks(range(len(w.labels)))
        axes[0].set_yticklabels(w.labels, fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.02, label="fraction of the full model")
    fig.suptitle("Where the search prunes (Pareto subnets, cheapest first)", y=1.04)
    return _save(fig, path, tight_box=True)


def plot_history(h: History, path: Path) -> Path:
    """Best feasible loss and hypervolume against finished trials."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(h.trial, h.best_loss, c="#1f4e8c")
    a.set_xlabel("trials")
    a.set_ylabel("best feasible proxy loss")
    a.grid(alpha=0.3)
    b.plot(h.trial, h.hypervolume, c="#2e8b57")
    b.set_xlabel("trials")
    b.set_ylabel("hypervolume")
    b.set_title(f"reference ({h.reference[0]:.3g} GFLOPs, loss {h.reference[1]:.3g})", fontsize=8)
    b.grid(alpha=0.3)
    return _save(fig, path)


def plot_sample_rows(grids: list[tuple[str, np.ndarray]], path: Path) -> Path:
    """Sample grids side by side (same seeds), one panel per model."""
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), squeeze=False)
    for ax, (name, image) in zip(axes[0], grids, strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def plot_bucket_fronts(d: BucketFronts, path: Path) -> Path:
    """One panel per timestep bucket: candidates, the bucket's Pareto front and each schedule's chosen point."""
    fig, axes = plt.subplots(1, len(d.labels), figsize=(3.4 * len(d.labels), 3.4), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.scatter(*d.points[k], s=8, c="#bbbbbb", label="candidates")
        ax.step(*d.fronts[k], where="post", c="#1f4e8c", lw=1.5, label="bucket front")
        for method, picks in d.chosen.items():
            marker, colour = _METHOD_STYLE.get(method, ("D", "black"))
            ax.scatter([picks[k][0]], [picks[k][1]], marker=marker, s=60, c=colour, label=method, zorder=5)
        ax.set_title(d.labels[k], fontsize=9)
        ax.set_xlabel("GFLOPs per step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(d.y_label)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Each timestep bucket's own front, and the point every schedule takes", y=1.02)
    return _save(fig, path, tight_box=True)


def plot_bucket_widths(w: BucketWidthMap, path: Path) -> Path:
    """Heat maps (timestep bucket x block) of heads, MLP width and token ratio, one row per schedule."""
    rows = max(1, len(w.methods))
    fig, axes = plt.subplots(rows, 3, figsize=(12, 0.6 + 1.6 * rows), squeeze=False, sharex=True, sharey=True)
    im = None
    for r in range(rows):
        for c, (data, name) in enumerate(zip((w.attn, w.mlp, w.tokens), ("attention heads", "MLP width", "token ratio"),
                                             strict=True)):
            ax = axes[r][c]
            if len(w.methods):
                im = ax.imshow(data[r][::-1], vmin=0, vmax=1, cmap="viridis", aspect="auto")  # noisiest bucket on top
                ax.set_xticks(range(data.shape[2]))
                ax.set_yticks(range(len(w.bucket_labels)))
                ax.set_yticklabels(w.bucket_labels[::-1], fontsize=7)
            if r == 0:
                ax.set_title(name)
            if c == 0 and len(w.methods):
                ax.set_ylabel(w.methods[r], fontsize=9)
            if r == rows - 1:
                ax.set_xlabel("block")
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.02, label="fraction of the full model")
    fig.suptitle("Where each schedule prunes, per timestep bucket (noisiest steps on top)", y=1.02)
    return _save(fig, path, tight_box=True)


def plot_comparison(summary: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str) -> Path:
    """`dynasearch compare`'s models: mean FD against GFLOPs per step, the bar spanning the seeds, each point named."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(summary.itertuples(index=False)):
        fd = runs.loc[runs["model"] == row.model, "FD"]
        colour = f"C{i % 10}"
        ax.errorbar([row.gflops], [fd.mean()], yerr=[[fd.mean() - fd.min()], [fd.max() - fd.mean()]], fmt="o",
                    c=colour, capsize=3, ms=6)
        ax.annotate(row.model, (row.gflops, fd.mean()), textcoords="offset points", xytext=(5, 4), fontsize=7, c=colour)
    ax.set_xlabel("GFLOPs per denoising step (fvcore convention, batch 1)")
    ax.set_ylabel("FD (mean over seeds; bar: min to max)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)
