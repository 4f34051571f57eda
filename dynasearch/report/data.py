"""Pure functions that gather what the report shows from a search's output files (no plotting, no model)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..checks import check_dir
from ..errors import DynasearchError
from ..search.proxy import PROXY_LABELS

__all__ = [
    "BucketFronts",
    "BucketWidthMap",
    "History",
    "ParetoPlotData",
    "ReportError",
    "SearchTables",
    "TimestepTables",
    "WidthMap",
    "bucket_fronts",
    "bucket_width_map",
    "comparison_table",
    "has_latency",
    "history",
    "hypervolume_2d",
    "is_timestep_output",
    "latency_plot_data",
    "pareto_plot_data",
    "pareto_table",
    "proxy_axis_label",
    "read_search",
    "read_timestep_search",
    "width_map",
]


class ReportError(DynasearchError):
    """A results directory that cannot be reported on."""


@dataclass
class SearchTables:
    """The CSV and JSON outputs of one search."""

    out: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame
    baseline: pd.DataFrame
    best: dict[str, Any]


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV output, with a clear error when it is missing or unreadable."""
    if not path.is_file():
        raise ReportError(f"results directory '{path.parent}' has no {path.name} (run 'dynasearch search' first)")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"'{path}' is not a readable CSV file: {exc}") from None


def _read_best(out: Path) -> dict[str, Any]:
    """best.json of a search directory."""
    try:
        return json.loads((out / "best.json").read_text())
    except FileNotFoundError:
        raise ReportError(f"results directory '{out}' has no best.json") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"'{out / 'best.json'}' is not valid JSON: {exc.msg}") from None


def read_search(out: str | Path) -> SearchTables:
    """Read trials.csv, pareto.csv, baseline.csv and best.json of a search directory."""
    out = check_dir(out, "results directory", ReportError)
    frames = {name: _read_csv(out / f"{name}.csv") for name in ("trials", "pareto", "baseline")}
    best = _read_best(out)
    return SearchTables(out, frames["trials"], frames["pareto"], frames["baseline"], best)


def pareto_table(t: SearchTables) -> pd.DataFrame:
    """The Pareto front's trials (number, GFLOPs, proxy loss) and their share of the full model's FLOPs."""
    cols = [c for c in ("number", "gflops", "proxy_loss") if c in t.pareto.columns]
    df = t.pareto[cols].copy()
    df["% of full"] = 100 * df["gflops"] / t.best["full_gflops"]
    return df


@dataclass
class ParetoPlotData:
    """Points and lines of the Pareto plot (GFLOPs, or predicted latency, on x; proxy loss on y)."""

    trials: tuple[np.ndarray, np.ndarray, np.ndarray]  # x, loss, feasible
    front: tuple[np.ndarray, np.ndarray]
    baseline: tuple[np.ndarray, np.ndarray]
    baseline_front: tuple[np.ndarray, np.ndarray]
    budget_gflops: float  # the budget on the x axis (GFLOPs, or ms when unit is "ms")
    full: tuple[float, float | None]
    best: tuple[float, float]
    unit: str = "GFLOPs"
    measured: tuple[np.ndarray, np.ndarray] | None = None  # exported subnets' measured ms and proxy loss
    y_label: str = "proxy loss"


def proxy_axis_label(best: dict[str, Any]) -> str:
    """What the search's proxy loss is, from best.json's settings (searches that recorded no proxy used eps)."""
    kind = best.get("settings", {}).get("proxy", "eps")
    return f"proxy loss: {kind} ({PROXY_LABELS.get(kind, 'unknown kind')})"


def pareto_plot_data(t: SearchTables) -> ParetoPlotData:
    """What pareto.png shows: every trial, the front, the uniform baseline, the budget and the full model."""
    done = t.trials[t.trials["state"] == "COMPLETE"].dropna(subset=["proxy_loss"])
    full_gflops = float(t.best["full_gflops"])
    full_rows = t.baseline[np.isclose(t.baseline["gflops"], full_gflops)]
    full_loss = float(full_rows["proxy_loss"].min()) if not full_rows.empty else None
    bf = t.baseline[t.baseline["on_front"].astype(bool)]
    return ParetoPlotData(
        trials=(done["gflops"].to_numpy(float), done["proxy_loss"].to_numpy(float), done["feasible"].to_numpy(bool)),
        front=(t.pareto["gflops"].to_numpy(float), t.pareto["proxy_loss"].to_numpy(float)),
        baseline=(t.baseline["gflops"].to_numpy(float), t.baseline["proxy_loss"].to_numpy(float)),
        baseline_front=(bf["gflops"].to_numpy(float), bf["proxy_loss"].to_numpy(float)),
        budget_gflops=float(t.best["budget_gflops"]),
        full=(full_gflops, full_loss),
        best=(float(t.best["gflops"]), float(t.best["proxy_loss"])),
        y_label=proxy_axis_label(t.best),
    )


def has_latency(t: SearchTables) -> bool:
    """Whether the search had a latency budget (its tables carry predicted latency)."""
    return "latency_ms" in t.trials.columns and "latency_budget_ms" in t.best


def _front(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (x, loss) Pareto front: points sorted by x that beat every cheaper one."""
    order = np.lexsort((loss, x))
    fx, fy, best = [], [], np.inf
    for i in order:
        if loss[i] < best:
            fx.append(x[i])
            fy.append(loss[i])
            best = loss[i]
    return np.asarray(fx, float), np.asarray(fy, float)


def latency_plot_data(t: SearchTables) -> ParetoPlotData:
    """The Pareto plot against predicted latency (ms): trials, the feasible front over latency, the uniform
    subnets, the latency budget, and the exported subnets at their measured latency."""
    done = t.trials[t.trials["state"] == "COMPLETE"].dropna(subset=["proxy_loss", "latency_ms"])
    x, loss = done["latency_ms"].to_numpy(float), done["proxy_loss"].to_numpy(float)
    feasible = done["feasible"].to_numpy(bool)
    base = t.baseline.dropna(subset=["latency_ms"])
    bx, by = base["latency_ms"].to_numpy(float), base["proxy_loss"].to_numpy(float)
    full_gflops = float(t.best["full_gflops"])
    full_rows = t.baseline[np.isclose(t.baseline["gflops"], full_gflops)]
    full_loss = float(full_rows["proxy_loss"].min()) if not full_rows.empty else None
    rows = [r for r in t.best.get("exported_latency", []) if r.get("measured_ms") is not None
            and r.get("proxy_loss") is not None]
    measured = (np.asarray([r["measured_ms"] for r in rows], float), np.asarray([r["proxy_loss"] for r in rows], float))
    return ParetoPlotData(
        trials=(x, loss, feasible), front=_front(x[feasible], loss[feasible]), baseline=(bx, by),
        baseline_front=_front(bx, by), budget_gflops=float(t.best["latency_budget_ms"]),
        full=(float(t.best["full_predicted_latency_ms"]), full_loss),
        best=(float(t.best["predicted_latency_ms"]), float(t.best["proxy_loss"])), unit="ms",
        measured=measured if rows else None, y_label=proxy_axis_label(t.best),
    )


@dataclass
class WidthMap:
    """Per-block rates of the Pareto subnets: rows are subnets (by FLOPs), columns blocks."""

    labels: list[str]
    attn: np.ndarray
    mlp: np.ndarray
    tokens: np.ndarray


def width_map(t: SearchTables) -> WidthMap:
    """Where the search prunes: attention, MLP and token rates of every Pareto subnet, block by block."""
    p = t.pareto.sort_values("gflops")
    depth = len([c for c in p.columns if c.startswith("attn_b")])
    if depth == 0 or p.empty:
        empty = np.zeros((0, depth))
        return WidthMap([], empty, empty, empty)
    cols = lambda prefix: [f"{prefix}_b{i}" for i in range(depth)]  # noqa: E731
    labels = [f"#{int(n)} {g:.3g}G" for n, g in zip(p["number"], p["gflops"], strict=True)]
    return WidthMap(labels, p[cols("attn")].to_numpy(float), p[cols("mlp")].to_numpy(float),
                    p[cols("tok")].to_numpy(float))


def hypervolume_2d(points: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by `points` (minimising both coordinates) up to `reference`."""
    pts = points[(points[:, 0] < reference[0]) & (points[:, 1] < reference[1])]
    if len(pts) == 0:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    area, best_y = 0.0, reference[1]
    for x, y in pts:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return float(area)


@dataclass
class History:
    """Best feasible loss and hypervolume after each finished trial."""

    trial: np.ndarray
    best_loss: np.ndarray
    hypervolume: np.ndarray
    reference: tuple[float, float]


def history(t: SearchTables) -> History:
    """Progress of the search against trials; the hypervolume's reference point is (budget, worst loss)."""
    done = t.trials[t.trials["state"].isin(["COMPLETE", "FAIL"])].sort_values("number")
    ok = done[(done["state"] == "COMPLETE")].dropna(subset=["proxy_loss"])
    worst = float(ok["proxy_loss"].max()) if not ok.empty else 1.0
    reference = (float(t.best["budget_gflops"]), worst * 1.05)
    best, hv, pts = [], [], []
    current = np.inf
    for _, row in done.iterrows():
        if row["state"] == "COMPLETE" and pd.notna(row["proxy_loss"]) and bool(row["feasible"]):
            current = min(current, float(row["proxy_loss"]))
            pts.append((float(row["gflops"]), float(row["proxy_loss"])))
        best.append(current)
        hv.append(hypervolume_2d(np.array(pts).reshape(-1, 2), reference))
    return History(np.arange(1, len(done) + 1), np.array(best), np.array(hv), reference)


# ---------------------------------------------------------------------------------------------------- timestep search
@dataclass
class TimestepTables:
    """The outputs of a timestep-aware search: bucket candidates, joint trials, the method comparison."""

    out: Path
    buckets: pd.DataFrame
    joint: pd.DataFrame
    comparison: pd.DataFrame
    best: dict[str, Any]


def is_timestep_output(out: str | Path) -> bool:
    """True for the output directory of a timestep-aware search."""
    return (Path(out) / "schedules.csv").is_file()


def read_timestep_search(out: str | Path) -> TimestepTables:
    """Read bucket_trials.csv, joint_trials.csv, schedules.csv and best.json."""
    out = check_dir(out, "results directory", ReportError)
    return TimestepTables(
        out, _read_csv(out / "bucket_trials.csv"), _read_csv(out / "joint_trials.csv"),
        _read_csv(out / "schedules.csv"), _read_best(out),
    )


def comparison_table(t: TimestepTables) -> pd.DataFrame:
    """The schedules compared, one row per method, FLOPs ratio in % of the full model (schedule JSON left out)."""
    comparison = t.comparison.drop(columns=["schedule", "static"], errors="ignore").copy()
    comparison["flops_ratio"] = 100 * comparison["flops_ratio"]
    return comparison.rename(columns={"flops_ratio": "% of full FLOPs"})


@dataclass
class BucketFronts:
    """Per timestep bucket: every candidate, the bucket's Pareto front and each method's chosen point."""

    labels: list[str]
    points: list[tuple[np.ndarray, np.ndarray]]
    fronts: list[tuple[np.ndarray, np.ndarray]]
    chosen: dict[str, list[tuple[float, float]]]
    y_label: str = "bucket proxy loss"


def bucket_fronts(t: TimestepTables) -> BucketFronts:
    """What buckets.png shows: GFLOPs against bucket loss, per bucket, with the schedules' choices marked."""
    labels, points, fronts = [], [], []
    for _k, group in t.buckets.groupby("bucket", sort=True):
        labels.append(str(group["timesteps"].iloc[0]))
        points.append((group["gflops"].to_numpy(float), group["proxy_loss"].to_numpy(float)))
        f = group[group["on_front"].astype(bool)].sort_values("gflops")
        fronts.append((f["gflops"].to_numpy(float), f["proxy_loss"].to_numpy(float)))
    chosen = {
        str(row["method"]): [(float(row[f"gflops_t{k}"]), float(row[f"loss_t{k}"])) for k in range(len(labels))]
        for _, row in t.comparison.iterrows()
    }
    return BucketFronts(labels, points, fronts, chosen, "bucket " + proxy_axis_label(t.best))


@dataclass
class BucketWidthMap:
    """Per-block rates of each method's schedule: arrays (methods, buckets, blocks)."""

    methods: list[str]
    bucket_labels: list[str]
    attn: np.ndarray
    mlp: np.ndarray
    tokens: np.ndarray


def bucket_width_map(t: TimestepTables) -> BucketWidthMap:
    """Where each schedule prunes, block by block, for every timestep bucket."""
    model = t.best.get("model_config") or {}
    heads = float(model.get("num_heads", 0)) or None
    mlp_full = float(model.get("hidden_size", 0) * model.get("mlp_ratio", 0)) or None
    methods, attn, mlp, tokens = [], [], [], []
    labels: list[str] = []
    for _, row in t.comparison.iterrows():
        schedule = json.loads(row["schedule"])
        bounds = schedule["timestep_boundaries"]
        labels = [f"t {lo}-{hi - 1}" for lo, hi in itertools.pairwise(bounds)]
        blocks = [b["blocks"] for b in schedule["buckets"]]
        h = np.array([[c["heads"] for c in bs] for bs in blocks], float)
        m = np.array([[c["mlp_hidden"] for c in bs] for bs in blocks], float)
        methods.append(str(row["method"]))
        attn.append(h / (heads or h.max()))
        mlp.append(m / (mlp_full or m.max()))
        tokens.append(np.array([[c["token_ratio"] for c in bs] for bs in blocks], float))
    return BucketWidthMap(methods, labels, np.array(attn), np.array(mlp), np.array(tokens))
