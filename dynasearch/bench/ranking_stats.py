"""Rank statistics of `bench ranking`: Kendall tau with its p-value and bootstrap interval, per proxy kind and
per ground truth (fine-tuned loss, fine-tuned FD), and the agreement between fine-tune seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from ..search.proxy import PROXY_KINDS

__all__ = [
    "GROUND_TRUTHS",
    "PROXY_TAU_GOAL",
    "TAU_GOAL",
    "kendall_bootstrap",
    "loss_summary",
    "proxy_column",
    "proxy_summary",
    "proxy_taus",
    "seed_taus",
    "tau_p",
]

TAU_GOAL = 0.7  # the eps proxy against the fine-tuned loss (the summary's kendall_tau)
GROUND_TRUTHS = ("finetuned_loss", "finetuned_fd")  # columns of the ranking table; lower is better for both
PROXY_TAU_GOAL = 0.8  # issue 13: the search's default proxy should rank near-budget subnets at least this well


def proxy_column(kind: str, evalset: bool = False) -> str:
    """The ranking table's column of proxy `kind` on the proxy set (or, with `evalset`, on the evaluation set)."""
    return f"proxy_{kind.replace('-', '_')}" + ("_evalset" if evalset else "")


def kendall_bootstrap(a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile 95% interval of Kendall tau between `a` and `b` over `reps` resamplings of the pairs (items)."""
    rng = np.random.default_rng(seed)
    n, taus = len(a), []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) < 3:
            continue
        tau, _ = kendalltau(a[idx], b[idx])
        if np.isfinite(tau):
            taus.append(tau)
    if not taus:
        return None, None
    lo, hi = np.percentile(taus, [2.5, 97.5])
    return float(lo), float(hi)


def tau_p(a: Any, b: Any) -> tuple[float | None, float | None]:
    """Kendall tau and its p-value as floats (None where undefined, e.g. constant input)."""
    tau, p = kendalltau(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    return (float(tau) if np.isfinite(tau) else None, float(p) if np.isfinite(p) else None)


def seed_taus(runs: pd.DataFrame, column: str = "finetuned_loss") -> list[float]:
    """Kendall tau between the fine-tuned `column` of every pair of fine-tune seeds (defined ones only)."""
    wide = runs.pivot(index="subnet", columns="finetune_seed", values=column)
    taus = []
    for a in range(wide.shape[1]):
        for b in range(a + 1, wide.shape[1]):
            t_ab, _ = tau_p(wide.iloc[:, a], wide.iloc[:, b])
            if t_ab is not None:
                taus.append(t_ab)
    return taus


def proxy_taus(
    table: pd.DataFrame, reps: int, seed: int = 0, kinds: Sequence[str] = PROXY_KINDS,
    costs: dict[str, dict[str, float]] | None = None,
) -> pd.DataFrame:
    """One row per proxy kind and ground truth present in `table`: Kendall tau of the proxy (on the proxy set)
    against the ground truth, its p-value and bootstrap 95% interval, the same on the evaluation set, the proxy
    set against the evaluation set (the proxy's own reliability), and the proxy's cost (`costs[kind]`)."""
    rows = []
    for kind in kinds:
        col, col_e = proxy_column(kind), proxy_column(kind, evalset=True)
        reliability, _ = tau_p(table[col], table[col_e])
        for truth in GROUND_TRUTHS:
            if truth not in table.columns:
                continue
            tau, p = tau_p(table[col], table[truth])
            lo, hi = kendall_bootstrap(table[col].to_numpy(float), table[truth].to_numpy(float), reps, seed)
            tau_e, _ = tau_p(table[col_e], table[truth])
            rows.append({"proxy": kind, "ground_truth": truth, "kendall_tau": tau, "p_value": p, "tau_ci95_lo": lo,
                         "tau_ci95_hi": hi, "kendall_tau_evalset": tau_e, "kendall_tau_proxy_vs_evalset": reliability,
                         **(costs or {}).get(kind, {})})
    return pd.DataFrame(rows)


def proxy_summary(taus: pd.DataFrame, table: pd.DataFrame, runs: pd.DataFrame) -> dict[str, Any]:
    """Per proxy kind and ground truth: tau, p-value and interval; the best kind per ground truth; the FD truth's
    own agreement (with the loss truth, between fine-tune seeds, with FLOPs alone)."""
    proxies: dict[str, Any] = {}
    for r in taus.itertuples(index=False):
        entry = proxies.setdefault(r.proxy, {"setup_s": r.setup_s, "score_s": r.score_s,
                                             "kendall_tau_proxy_vs_evalset": r.kendall_tau_proxy_vs_evalset})
        entry[r.ground_truth] = {"kendall_tau": r.kendall_tau, "p_value": r.p_value,
                                 "tau_ci95": [r.tau_ci95_lo, r.tau_ci95_hi],
                                 "kendall_tau_evalset": r.kendall_tau_evalset}
    best = {}
    for truth in GROUND_TRUTHS:
        rows = taus[(taus["ground_truth"] == truth) & taus["kendall_tau"].notna()]
        if not rows.empty:
            top = rows.sort_values("kendall_tau", ascending=False, kind="stable").iloc[0]
            best[truth] = {"proxy": top["proxy"], "kendall_tau": float(top["kendall_tau"]),
                           "goal_met": bool(top["kendall_tau"] >= PROXY_TAU_GOAL)}
    out: dict[str, Any] = {"proxies": proxies, "proxy_goal": f"tau >= {PROXY_TAU_GOAL}", "best_proxy": best}
    if "finetuned_fd" in table.columns:
        fd_seed_taus = seed_taus(runs, "finetuned_fd") if runs["finetune_seed"].nunique() > 1 else []
        out["kendall_tau_fd_vs_loss"] = tau_p(table["finetuned_fd"], table["finetuned_loss"])[0]
        out["kendall_tau_fd_between_finetune_seeds"] = float(np.mean(fd_seed_taus)) if fd_seed_taus else None
        out["kendall_tau_flops_baseline_fd"] = tau_p(-table["gflops"], table["finetuned_fd"])[0]
    return out


def loss_summary(table: pd.DataFrame, runs: pd.DataFrame, reps: int, seed: int = 0) -> dict[str, Any]:
    """The eps proxy against the fine-tuned loss: Kendall tau (with p-value and `reps`-resampling bootstrap interval)
    and the taus that bound it, the goal and the spreads."""
    tau, p = tau_p(table["inherited_loss"], table["finetuned_loss"])
    lo, hi = kendall_bootstrap(table["inherited_loss"].to_numpy(float), table["finetuned_loss"].to_numpy(float),
                               reps, seed)
    tau_same, p_same = tau_p(table["inherited_eval_loss"], table["finetuned_loss"])
    tau_reliability, _ = tau_p(table["inherited_loss"], table["inherited_eval_loss"])
    tau_flops, _ = tau_p(-table["gflops"], table["finetuned_loss"])
    between = seed_taus(runs) if runs["finetune_seed"].nunique() > 1 else []
    return {
        "kendall_tau": tau,
        "p_value": p,
        "tau_ci95": [lo, hi],
        "goal": f"tau >= {TAU_GOAL}",
        "goal_met": bool(tau is not None and tau >= TAU_GOAL),
        "kendall_tau_same_set": tau_same,
        "p_value_same_set": p_same,
        "kendall_tau_proxy_vs_evalset": tau_reliability,
        "kendall_tau_between_finetune_seeds": float(np.mean(between)) if between else None,
        "kendall_tau_flops_baseline": tau_flops,
        "flops_ratio_range": [float(table["flops_ratio"].min()), float(table["flops_ratio"].max())],
        "inherited_loss_spread": float(table["inherited_loss"].max() - table["inherited_loss"].min()),
        "mean_improvement": float(table["improvement"].mean()),
    }
