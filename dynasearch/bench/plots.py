"""The benchmarks' figures (matplotlib, Agg), drawn from a :class:`BenchResult`'s tables only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..fileio import atomic_output
from .common import BenchResult

__all__ = [
    "PLOTS",
    "plot_flops",
    "plot_for",
    "plot_gpu",
    "plot_latency",
    "plot_latency_table",
    "plot_ranking",
    "plot_search",
    "plot_train",
]


def _save(fig: plt.Figure, path: Path, result: BenchResult) -> Path:
    m = result.machine
    fig.text(0.01, 0.005, f"{m.get('device_name', '?')} | torch {m.get('torch', '?')} | {m.get('threads', '?')} "
                          f"threads | {result.date}", fontsize=6, color="#666666")
    try:
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        with atomic_output(path) as tmp:  # a reader (or a full disk) never sees half a PNG
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def _dress(
    ax: plt.Axes, xlabel: str | None = None, ylabel: str | None = None, title: str | None = None, title_size: int = 9,
    legend: int | None = None, grid: str = "both",
) -> None:
    """Axis labels, a title, a light grid (on `grid`: both, x or y) and, given a font size, the legend."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3, axis=grid)
    if legend is not None:
        ax.legend(fontsize=legend)


def plot_latency(result: BenchResult, path: Path) -> Path:
    """Latency ratio against FLOPs ratio (the diagonal is 'speed-up = FLOPs saving', with the 10% band)."""
    t, s = result.table, result.summary
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.linspace(0, 1.05, 50)
    a.plot(x, x, c="black", lw=1, label="latency ratio = FLOPs ratio")
    a.fill_between(x, 0.9 * x, 1.1 * x, color="#cccccc", alpha=0.5, label="within 10%")
    a.axvspan(0.3, 0.7, color="#7aa6d6", alpha=0.08, label="target range")
    for kind, colour, marker in (("full", "black", "*"), ("uniform", "#e08b3a", "o"), ("mixed", "#2e8b57", "^"),
                                 ("searched", "#1f4e8c", "s")):
        k = t[t["kind"] == kind]
        a.scatter(k["flops_ratio"], k["latency_ratio"], c=colour, marker=marker, s=50 if kind != "full" else 120,
                  label=kind, zorder=5)
    a.set_xlim(0, 1.05)
    a.set_ylim(0, max(1.1, float(t["latency_ratio"].max()) * 1.05))
    _dress(a, "FLOPs ratio (subnet / full)", "latency ratio (subnet / full)",
           f"{s['model']}, batch {s['batch']}, {s['device']} ({s['dtype']})", legend=7)
    sub = t[t["kind"] != "full"]
    colours = {"searched": "#1f4e8c", "mixed": "#2e8b57"}
    b.bar(range(len(sub)), sub["quotient"], color=[colours.get(k, "#e08b3a") for k in sub["kind"]])
    b.axhline(1.0, c="black", lw=1)
    b.axhline(s.get("dydit_reference_quotient", 0.84), c="#c0392b", ls="--", lw=1, label="DyDiT-XL (0.84)")
    b.set_xticks(range(len(sub)))
    b.set_xticklabels([f"{n}\n{r:.2f}" for n, r in zip(sub["name"], sub["flops_ratio"], strict=True)],
                      fontsize=6, rotation=30)
    _dress(b, None, "quotient = FLOPs ratio / latency ratio", "1.0: the speed-up equals the FLOPs saving", legend=7,
           grid="y")
    return _save(fig, path, result)


def plot_flops(result: BenchResult, path: Path) -> Path:
    """GFLOPs per registry model, fvcore and closed form side by side (log scale), and parameters."""
    t = result.table
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    i = np.arange(len(t))
    a.bar(i - 0.2, t["gflops_fvcore"], 0.4, label="fvcore (+ attention handler)", color="#1f4e8c")
    a.bar(i + 0.2, t["gflops_closed_form"], 0.4, label="closed form", color="#e08b3a")
    a.set_yscale("log")
    a.set_xticks(i)
    a.set_xticklabels(t["model"], rotation=60, fontsize=7)
    _dress(a, None, "GFLOPs (multiply-adds, batch 1)", result.summary.get("data", ""), legend=7, grid="y")
    b.bar(i, t["params_m"], color="#2e8b57")
    b.set_yscale("log")
    b.set_xticks(i)
    b.set_xticklabels(t["model"], rotation=60, fontsize=7)
    _dress(b, None, "parameters (M, without token routers)", grid="y")
    return _save(fig, path, result)


def plot_search(result: BenchResult, path: Path) -> Path:
    """Mean hypervolume against trials per sampler (band: min-max over seeds), random's final mean as a line."""
    c = result.extra["curves"]
    s = result.summary
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for sampler, runs in c.groupby("sampler", sort=False):
        hv = runs.pivot(index="trial", columns="seed", values="hypervolume")
        ax.plot(hv.index, hv.mean(axis=1), lw=2, label=sampler)
        ax.fill_between(hv.index, hv.min(axis=1), hv.max(axis=1), alpha=0.15)
    if s.get("random_final_hv_mean") is not None:
        ax.axhline(s["random_final_hv_mean"], c="black", ls="--", lw=1, label="random: final mean")
    if s.get("random_feasible_final_hv_mean") is not None:
        ax.axhline(s["random_feasible_final_hv_mean"], c="#777777", ls="-.", lw=1, label="random-feasible: final mean")
    trials = int(c["trial"].max())
    ax.axvline(trials / 3, c="#c0392b", ls=":", lw=1, label="1/3 of the trials")
    ref = s["reference"]
    seeds = int(c.groupby("sampler")["seed"].nunique().max())
    _dress(ax, "trials", "hypervolume (GFLOPs x proxy loss)",
           f"{s['model']}, budget {s['budget_gflops']:.3g} GFLOPs; reference ({ref['gflops']:.3g}, "
           f"{ref['proxy_loss']:.4g}); mean of {seeds} seeds, band: min-max", legend=8)
    return _save(fig, path, result)


def plot_ranking(result: BenchResult, path: Path) -> Path:
    """Fine-tuned against inherited loss (coloured by FLOPs ratio) with Kendall tau, and both losses against FLOPs."""
    t, s = result.table, result.summary
    taus = result.extra.get("proxies")
    panels = 3 if taus is not None and not taus.empty else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6))
    ax, bx = axes[0], axes[1]
    sc = ax.scatter(t["inherited_loss"], t["finetuned_loss"], c=t["flops_ratio"], cmap="viridis", s=50, zorder=5)
    for _, r in t.iterrows():
        ax.annotate(str(int(r["subnet"])), (r["inherited_loss"], r["finetuned_loss"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="FLOPs ratio")
    tau, ci = s.get("kendall_tau"), s.get("tau_ci95") or [None, None]

    def fmt(value: float | None) -> str:
        """Two or three decimals, or a word where the value is undefined."""
        return "n/a" if value is None else f"{value:.2f}"

    p = s.get("p_value")
    _dress(ax, "inherited from the supernet: proxy-set loss", "fine-tuned alone: evaluation-set loss",
           f"{s['model']}: Kendall tau = {fmt(tau)} (p {'n/a' if p is None else f'{p:.2g}'}, bootstrap 95% "
           f"{fmt(ci[0])}..{fmt(ci[1])})\n"
           f"same evaluation set {fmt(s.get('kendall_tau_same_set'))}, proxy vs evaluation set "
           f"{fmt(s.get('kendall_tau_proxy_vs_evalset'))}, FLOPs only {fmt(s.get('kendall_tau_flops_baseline'))}",
           title_size=8)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.yaxis.set_major_locator(plt.MaxNLocator(6))
    order = t.sort_values("flops_ratio")
    bx.plot(order["flops_ratio"], order["inherited_eval_loss"], marker="o", label="inherited (evaluation set)")
    bx.plot(order["flops_ratio"], order["finetuned_loss"], marker="s", label="fine-tuned (evaluation set)")
    if "finetuned_loss_std" in order and (order["finetuned_loss_std"] > 0).any():
        bx.errorbar(order["flops_ratio"], order["finetuned_loss"], yerr=order["finetuned_loss_std"], fmt="none",
                    ecolor="#e08b3a", capsize=3)
    st = result.settings
    _dress(bx, "FLOPs ratio (subnet / full)", "epsilon MSE",
           f"{st.get('finetune_steps')} steps, lr {st.get('lr')} {st.get('lr_schedule', '')}, "
           f"{st.get('finetune_seeds', 1)} seed(s)", title_size=8, legend=7)
    if panels == 3:
        _proxy_tau_bars(axes[2], taus, s.get("proxy_goal"))
    return _save(fig, path, result)


def _proxy_tau_bars(ax: plt.Axes, taus: pd.DataFrame, goal: str | None) -> None:
    """Kendall tau of every proxy kind against every ground truth, with the bootstrap 95% intervals."""
    kinds, truths = list(dict.fromkeys(taus["proxy"])), list(dict.fromkeys(taus["ground_truth"]))
    width = 0.8 / len(truths)
    for j, truth in enumerate(truths):
        rows = taus[taus["ground_truth"] == truth].set_index("proxy").reindex(kinds)
        x = np.arange(len(kinds)) + (j - (len(truths) - 1) / 2) * width
        tau = rows["kendall_tau"].to_numpy(float)
        err = np.abs(np.vstack([tau - rows["tau_ci95_lo"].to_numpy(float), rows["tau_ci95_hi"].to_numpy(float) - tau]))
        ax.bar(x, tau, width, label=truth.replace("_", " "), yerr=np.nan_to_num(err), capsize=3)
    if goal:
        ax.axhline(float(goal.split()[-1]), color="black", lw=1, ls="--", label=goal)
    ax.set_xticks(np.arange(len(kinds)), kinds, fontsize=8)
    ax.set_ylim(-1.0, 1.0)
    _dress(ax, "proxy (inherited weights)", "Kendall tau", "each proxy against each ground truth (bootstrap 95%)",
           title_size=8, legend=7, grid="y")


def plot_train(result: BenchResult, path: Path) -> Path:
    """Measured against ideal time per part of the sandwich step, and the step's overhead over the steps."""
    t, steps = result.table, result.extra["steps"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    i = np.arange(len(t))
    a.bar(i - 0.2, t["measured_ms"], 0.4, label="measured", color="#1f4e8c")
    a.bar(i + 0.2, t["ideal_ms"], 0.4, label="FLOPs-proportional ideal", color="#bbbbbb")
    a.set_xticks(i)
    a.set_xticklabels(t["part"], fontsize=7, rotation=20)
    _dress(a, None, "fwd + bwd time (ms, median)", legend=7, grid="y")
    b.plot(steps["step"], steps["overhead"], marker="o", c="#c0392b")
    b.axhline(1.0, c="black", lw=1)
    _dress(b, "step", "sandwich step / ideal",
           f"{result.summary['model']}: median overhead {result.summary['overhead_median']:.2f}x")
    return _save(fig, path, result)


def plot_latency_table(result: BenchResult, path: Path) -> Path:
    """A latency table's predicted against measured latency of whole subnets, and each prediction's error."""
    t, s = result.table, result.summary
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    if not t.empty:
        top = 1.05 * float(max(t["predicted_ms"].max(), t["measured_ms"].max()))
        x = np.linspace(0, top, 50)
        a.plot(x, x, c="black", lw=1, label="predicted = measured")
        a.fill_between(x, 0.95 * x, 1.05 * x, color="#cccccc", alpha=0.5, label="within 5%")
        a.scatter(t["measured_ms"], t["predicted_ms"], c="#1f4e8c", zorder=5, label="subnets")
        b.bar(range(len(t)), t["error_pct"], color="#1f4e8c")
        b.set_xticks(range(len(t)))
        b.set_xticklabels([f"{n}\n{r:.2f}" for n, r in zip(t["name"], t["flops_ratio"], strict=True)],
                          fontsize=6, rotation=30)
    b.axhline(0.0, c="black", lw=1)
    median = s.get("median_abs_error_pct")
    _dress(a, "measured (ms)", "predicted by the table (ms)",
           f"{s['model']}, batch {s['batch']}, {s['device']} ({s['dtype']})", legend=7)
    _dress(b, None, "prediction error (%)",
           "median |error| " + ("n/a" if median is None else f"{median:.1f}%") + " (target 5%)", grid="y")
    return _save(fig, path, result)


def plot_gpu(result: BenchResult, path: Path) -> Path:
    """The GPU check: latency ratio / FLOPs ratio of every subnet per batch and compile mode (target band)."""
    t, s = result.table, result.summary
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(1.0, c="black", lw=1)
    ax.axhline(1.10, c="#c0392b", ls="--", lw=1, label="target 1.10")
    ax.axvspan(0.3, 0.7, color="#7aa6d6", alpha=0.08, label="target range")
    sub = t[t["kind"] != "full"]
    for (batch, compiled), g in sub.groupby(["batch", "compiled"]):
        ax.scatter(g["flops_ratio"], g["latency_per_flops"], label=f"batch {batch}{', compiled' if compiled else ''}",
                   marker="s" if compiled else "o")
    _dress(ax, "FLOPs ratio (subnet / full)", "latency ratio / FLOPs ratio (1.0 = ideal)",
           f"{s['model']} on {s['device_name']} ({s['dtype']})", legend=7)
    return _save(fig, path, result)


PLOTS = {"latency": plot_latency, "flops": plot_flops, "search": plot_search, "ranking": plot_ranking,
         "train": plot_train, "latency-table": plot_latency_table, "gpu": plot_gpu}


def plot_for(result: BenchResult):
    """The plotting function of a result: the longest registered prefix of its name (latency-cpu -> latency,
    latency-table-cpu -> latency-table)."""
    parts = result.name.split("-")
    for n in range(len(parts), 0, -1):
        if "-".join(parts[:n]) in PLOTS:
            return PLOTS["-".join(parts[:n])]
    raise KeyError(f"no plot for benchmark '{result.name}'")
