"""Everything a search leaves behind: trials.csv, pareto.csv, baseline.csv, best.json and sliced checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from ..checkpoint.native import inherited_sections, save_checkpoint
from ..cost.flops import count_flops
from ..errors import SearchError
from ..fileio import atomic_write_text
from ..model.subnet import Subnet
from ..slicing import slice_subnet
from .context import SearchContext
from .latency import latency_note, latency_rows, predicted_ms, with_latency
from .storage import DEFAULT_JOURNAL, mask_url
from .trials import ATTR_RETRY_OF, FINISHED, crashed_numbers, finished_count

__all__ = [
    "SearchResult",
    "baseline_frame",
    "export_subnets",
    "pareto_frame",
    "search_settings",
    "trials_frame",
    "write_outputs",
]


@dataclass
class SearchResult:
    """Tables and files of a finished search."""

    out: Path
    trials: pd.DataFrame
    pareto: pd.DataFrame
    baseline: pd.DataFrame
    best: dict[str, Any]
    exported: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _block_columns(ctx: SearchContext, subnet: Subnet) -> dict[str, float]:
    """Each block's choices as fractions of the full model (columns attn_bI, mlp_bI, tok_bI)."""
    cfg = ctx.model.config
    cols: dict[str, float] = {}
    for i, b in enumerate(subnet.blocks):
        cols[f"attn_b{i}"] = b.heads / cfg.num_heads
        cols[f"mlp_b{i}"] = b.mlp_hidden / cfg.mlp_hidden
        cols[f"tok_b{i}"] = b.token_ratio
    return cols


def trials_frame(ctx: SearchContext, study: optuna.Study) -> pd.DataFrame:
    """One row per trial (pruned surplus trials left out): choices, GFLOPs, proxy loss, feasibility, seconds.

    `counted` says whether the trial counts toward --trials (crashed trials do not: their retry does);
    `retry_of` names the crashed trial a retry re-runs.
    """
    rows = []
    trials = study.get_trials(deepcopy=False)
    crashed = crashed_numbers(trials)
    retries = {t.user_attrs[ATTR_RETRY_OF]: t.number for t in trials if ATTR_RETRY_OF in t.user_attrs}
    for t in trials:
        if t.state in (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.WAITING):
            continue
        subnet = Subnet.from_dict(t.user_attrs["subnet"]) if "subnet" in t.user_attrs else None
        flops = t.user_attrs.get("flops")
        done = t.state == optuna.trial.TrialState.COMPLETE
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "gflops": flops / 1e9 if flops is not None else None,
            "proxy_loss": t.values[0] if done and t.values else None,
            "feasible": bool(flops is not None and flops <= ctx.budget),
            "seconds": seconds,
            "fail_reason": _fail_reason(t, t.number in crashed, retries.get(t.number)),
            "counted": t.state in FINISHED and t.number not in crashed,
            "retry_of": t.user_attrs.get(ATTR_RETRY_OF),
        }
        if subnet is not None:
            row.update(_block_columns(ctx, subnet))
            row["subnet"] = subnet.to_json()
        rows.append(row)
    return pd.DataFrame(rows)


def _fail_reason(trial: optuna.trial.FrozenTrial, crashed: bool, retry: int | None) -> str:
    """Why a FAIL trial failed ('' for other states); crashed trials name the trial that retries them."""
    if trial.state != optuna.trial.TrialState.FAIL:
        return ""
    reason = trial.user_attrs.get("fail_reason") or ("the worker stopped sending heartbeats" if crashed else "")
    if crashed:
        reason += f"; retried as trial {retry}" if retry is not None else "; not retried (it was a retry)"
    return reason


def pareto_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated feasible completed trials (one per distinct subnet), sorted by FLOPs."""
    if trials.empty:
        return trials
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"]].dropna(subset=["proxy_loss"])
    ok = ok.sort_values(["gflops", "proxy_loss", "number"]).drop_duplicates(subset="subnet")
    front, best = [], float("inf")
    for _, row in ok.iterrows():  # sorted by FLOPs: a point is on the front if it beats every cheaper one
        if row["proxy_loss"] < best:
            front.append(row)
            best = row["proxy_loss"]
    return pd.DataFrame(front).reset_index(drop=True)


def baseline_frame(ctx: SearchContext) -> pd.DataFrame:
    """Uniform-width subnets over the space's choices, scored with the same proxy: plain uniform slimming."""
    s, cfg = ctx.space, ctx.model.config
    rows = []
    for (a, m, r), subnet in s.uniform_subnets(cfg):
        flops = ctx.flops(subnet)
        rows.append(
            {
                "attn_rate": a,
                "mlp_rate": m,
                "token_ratio": r,
                "gflops": flops / 1e9,
                "proxy_loss": ctx.evaluator(subnet),
                "feasible": flops <= ctx.budget,
                "subnet": subnet.to_json(),
            }
        )
    df = pd.DataFrame(rows).sort_values("gflops").reset_index(drop=True)
    best = float("inf")
    on_front = []
    for loss in df["proxy_loss"]:
        on_front.append(loss < best)
        best = min(best, loss)
    df["on_front"] = on_front
    return df


def _pick_exports(pareto: pd.DataFrame, k: int) -> list[int]:
    """Indices of k Pareto points spread evenly over the front's FLOPs range."""
    n = len(pareto)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {n - 1})


def export_subnets(ctx: SearchContext, entries: list[tuple[str, Subnet, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Slice each subnet into a standalone checkpoint under out/subnets/NAME, re-counting its FLOPs with fvcore."""
    exported = []
    for name, subnet, info in entries:
        small = slice_subnet(ctx.model, subnet)
        counted = count_flops(small).total
        expected = ctx.flops(subnet)
        if counted != expected:
            raise SearchError(
                f"exported subnet '{name}': fvcore counts {counted} FLOPs but the search counted {expected}"
            )
        directory = ctx.config.out / "subnets" / name
        meta = {**info, "flops": counted, "gflops": counted / 1e9, "source_supernet": str(ctx.config.supernet)}
        save_checkpoint(small, directory, extra={"search": meta, **inherited_sections(ctx.config.supernet)})
        atomic_write_text(directory / "subnet.json", json.dumps(subnet.to_dict(), indent=2) + "\n")
        params = sum(p.numel() for p in small.parameters())
        exported.append({"name": name, "path": str(directory), "gflops": counted / 1e9, "params": params, **info})
    return exported


def search_settings(ctx: SearchContext) -> dict[str, Any]:
    """The settings best.json records: the study's settings, the sampler, trials, seed, study and storage (masked)."""
    config = ctx.config
    storage = mask_url(config.storage or str(config.out / DEFAULT_JOURNAL))
    return {**ctx.settings, "sampler": config.sampler, "trials": config.trials, "seed": config.seed,
            "study_name": config.study_name, "storage": storage}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _full_fits(ctx: SearchContext) -> bool:
    """Whether the full model is within every budget (then it is the answer)."""
    if ctx.budget < ctx.full_flops:
        return False
    return ctx.latency_table is None or ctx.latency_table.predict() <= (ctx.latency_budget or 0.0)


def _best(ctx: SearchContext, trials: pd.DataFrame) -> tuple[Subnet, dict[str, Any]]:
    """The best feasible trial (every budget); the full model when it fits them all."""
    if _full_fits(ctx):
        subnet = Subnet.full(ctx.model.config)
        return subnet, {"trial": None, "gflops": ctx.full_flops / 1e9, "proxy_loss": ctx.evaluator(subnet),
                        "full_model": True}
    ok = (trials[(trials["state"] == "COMPLETE") & trials["feasible"]].dropna(subset=["proxy_loss"])
          if not trials.empty else trials)
    if ok.empty:
        raise SearchError("no trial finished within the budget; run more --trials or raise "
                          + ("--flops" if ctx.latency_table is None else "--latency / --flops"))
    row = ok.sort_values(["proxy_loss", "gflops", "number"]).iloc[0]
    subnet = Subnet.from_dict(json.loads(row["subnet"]))
    return subnet, {"trial": int(row["number"]), "gflops": float(row["gflops"]), "proxy_loss": float(row["proxy_loss"]),
                    "full_model": False}


def _entries(ctx: SearchContext, best_subnet: Subnet, best: dict[str, Any], pareto: pd.DataFrame,
             best_uniform: dict[str, Any] | None) -> list[tuple[str, Subnet, dict[str, Any]]]:
    """What to export: the best subnet, Pareto points spread over the front, the best uniform subnet."""
    entries = [("best", best_subnet, {"role": "best within budget", **best})]
    for rank, idx in enumerate(_pick_exports(pareto, ctx.config.export_top), start=1):
        row = pareto.iloc[idx]
        subnet = Subnet.from_dict(json.loads(row["subnet"]))
        if subnet == best_subnet:
            continue  # already exported as "best"
        info = {"role": "pareto", "trial": int(row["number"]), "proxy_loss": float(row["proxy_loss"])}
        entries.append((f"pareto-{rank:02d}", subnet, info))
    if best_uniform is not None:  # the baseline a searched subnet has to beat, sliced the same way
        info = {"role": "best uniform within budget", "trial": None, "proxy_loss": float(best_uniform["proxy_loss"]),
                "rates": {k: float(best_uniform[k]) for k in ("attn_rate", "mlp_rate", "token_ratio")}}
        entries.append(("uniform", Subnet.from_dict(json.loads(best_uniform["subnet"])), info))
    if ctx.latency_table is not None:
        for _, subnet, info in entries:
            info["predicted_latency_ms"] = predicted_ms(ctx, subnet)
    return entries


def write_outputs(ctx: SearchContext, study: optuna.Study) -> SearchResult:
    """Gather the study into tables and files in the output directory; export the chosen subnets.

    With a latency budget the tables gain latency_ms, `feasible` requires both budgets, the exported subnets are
    measured on the table's device and latency.csv lists them against the budget.
    """
    out, timed = ctx.config.out, ctx.latency_table is not None
    trials = trials_frame(ctx, study)
    baseline = baseline_frame(ctx)
    if timed:
        trials, baseline = with_latency(ctx, trials), with_latency(ctx, baseline)
    pareto = pareto_frame(trials)
    best_subnet, best = _best(ctx, trials)
    notes = [latency_note(ctx)] if timed else []
    if best.get("full_model"):
        notes.append(f"the budget is at or above the full model ({ctx.full_flops / 1e9:.4f} GFLOPs): the full model is "
                     "returned")
    done = finished_count(study)
    if done < ctx.config.trials:
        notes.append(
            f"{done} of {ctx.config.trials} trials are finished (other workers are still running, or died): "
            "rerun the same command to finish"
        )
    uniform_ok = baseline[baseline["feasible"]]
    best_uniform = uniform_ok.sort_values("proxy_loss").iloc[0].to_dict() if not uniform_ok.empty else None
    entries = _entries(ctx, best_subnet, best, pareto, best_uniform)
    exported = export_subnets(ctx, entries)
    tables = {"trials": trials, "pareto": pareto, "baseline": baseline}
    latency: dict[str, Any] = {}
    if timed:
        rows = latency_rows(ctx, exported, [subnet for _, subnet, _ in entries])
        if rows and rows[0]["measured_ms"] is None:
            notes.append(f"the table's device ({ctx.latency_table.device}) is not available here: "
                         "exported subnets not measured")
        tables["latency"] = pd.DataFrame(rows)
        best["predicted_latency_ms"] = exported[0]["predicted_latency_ms"]
        best["measured_latency_ms"] = exported[0]["measured_latency_ms"]
        latency = {"latency_budget_ms": 1e3 * ctx.latency_budget, "full_predicted_latency_ms": predicted_ms(ctx),
                   "exported_latency": rows}
    for name, frame in tables.items():
        _write_csv(frame, out / f"{name}.csv")
    summary = {
        **best,
        "subnet": best_subnet.to_dict(),
        "budget_gflops": ctx.budget / 1e9,
        "full_gflops": ctx.full_flops / 1e9,
        **latency,
        "best_uniform": best_uniform,
        "settings": {**search_settings(ctx), "workers": ctx.config.workers},
        "finished_trials": done,
        "crashed_trials": int((~trials["counted"] & (trials["state"] == "FAIL")).sum()) if not trials.empty else 0,
        "notes": notes,
    }
    atomic_write_text(out / "best.json", json.dumps(summary, indent=2, default=float) + "\n")
    return SearchResult(out, trials, pareto, baseline, summary, exported, notes)
