"""`dynasearch bench latency-table`: measure a latency table on this device and check its predictions.

Each part is measured in place on activations of the model's shape, on a physically sliced copy of block 0 (the
code every exported subnet runs; latency does not depend on the weight values, so they are random): the
embedders, the attention half of a block with every head count, the MLP half with every MLP width on the token
counts of the space's token ratios, and the final layer. A part's time is the median of `repeats` timed calls
after `warmup` untimed ones; with `rounds` > 1, the median of the per-round medians (every part and every
validation subnet is timed once per round, so drifting load hits all alike).

The table is then validated: `validate` random subnets of the space (and the full model) are sliced and timed
whole (:func:`dynasearch.cost.latency.measure_latency`), and each is compared with the table's prediction;
the summary reports the median and largest absolute error (target: median <= 5%).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ..cost.flops import closed_form_flops
from ..cost.latency import measure_latency
from ..cost.latency_table import SCALE_RANGE, LatencyTable
from ..model.config import DiTConfig, get_config
from ..model.dit import DiT, DiTBlock
from ..model.subnet import BlockChoice, Subnet
from ..slicing import slice_subnet
from ..space import DEFAULT_SPACE, load_space
from .common import BenchConfig, BenchError, BenchResult, bench_run, command_line

__all__ = [
    "DTYPE_NAMES",
    "TARGET_MEDIAN_ERROR",
    "LatencyTableConfig",
    "LatencyTableResult",
    "bench_latency_table",
    "calibration_subnets",
    "fit_scale",
    "measure_table",
    "time_call",
    "validate_table",
]

TARGET_MEDIAN_ERROR = 0.05
CALIBRATION_SEED_OFFSET = 7919  # the calibration subnets' random stream, apart from the validation one
DTYPE_NAMES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LatencyTableConfig(BenchConfig):
    """Which model, batch, device and dtype the table is for; which choices; how to time and validate it."""

    model: str = "DiT-B/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    batch: int = 8
    device: str = "cpu"
    dtype: str = "fp32"  # fp32, or bf16 (autocast)
    space: str = DEFAULT_SPACE  # token ratios measured, and the space the validation subnets are drawn from
    token_ratios: tuple[float, ...] | None = None  # default: the space's
    repeats: int = 10
    warmup: int = 3
    rounds: int = 1
    copies: int = 4  # block copies each entry rotates over (distinct weights, as in a whole forward pass)
    validate: int = 8
    calibrate: int = 4  # whole forwards the scale is fitted on: the full model, the smallest, random ones
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.check_positive("input_size", "in_channels", "num_classes", "batch", "repeats", "rounds", "copies",
                            "threads")
        self.check_non_negative("warmup", "validate", "calibrate")
        self.check_device()
        if self.dtype not in DTYPE_NAMES:
            raise BenchError(f"--dtype must be fp32 or bf16, got '{self.dtype}'")
        for r in self.token_ratios or ():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise BenchError(f"--token-ratios must be numbers in (0, 1], got {r!r}")
        if self.token_ratios is not None and not self.token_ratios:
            raise BenchError("--token-ratios must name at least one token ratio")


@dataclass
class LatencyTableResult(BenchResult):
    """A benchmark result that also carries the measured table (written beside it as NAME.table.json)."""

    latency_table: LatencyTable | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` timed calls of `fn` after `warmup` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def table_choices(config: DiTConfig, token_ratios: tuple[float, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """Head counts (all of them) and (MLP width, tokens) pairs (every group multiple, each token count) to time."""
    heads = list(range(1, config.num_heads + 1))
    counts = sorted({config.tokens_kept(r) if config.token_selection else config.num_tokens for r in token_ratios}
                    | {config.num_tokens})
    widths = [g * config.mlp_group_size for g in range(1, config.mlp_groups + 1)]
    return heads, [(w, k) for w in widths for k in counts]


def _part_calls(model: DiT, batch: int, device: torch.device, token_ratios: tuple[float, ...],
                copies: int = 1) -> dict[tuple[str, int, int], Callable[[], Any]]:
    """One callable per table entry, keyed (part, heads or width, tokens), on activations of the model's shape;
    each block entry rotates over sliced copies of the first `copies` blocks."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    n, d = cfg.num_tokens, cfg.hidden_size
    img = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    x = torch.randn(batch, n, d, generator=gen).to(device)
    c = torch.randn(batch, d, generator=gen).to(device)
    mods = tuple(torch.randn(batch, d, generator=gen).to(device) * 0.1 for _ in range(3))
    calls: dict[tuple[str, int, int], Callable[[], Any]] = {
        ("embed", 0, 0): lambda: model.embed(img, t, y, False),
        ("final", 0, 0): lambda: model.head(x, c),
    }
    heads, pairs = table_choices(cfg, token_ratios)
    blocks = list(model.blocks[:copies])
    for h in heads:
        choice = BlockChoice(h, cfg.mlp_hidden, 1.0)
        turn = _Rotation([b.to_static(choice).eval() for b in blocks])
        calls[("attn", h, n)] = lambda r=turn, ch=choice: r.next().attn_part(x, c, ch)
    statics: dict[int, _Rotation] = {}
    for w, k in pairs:
        if w not in statics:
            statics[w] = _Rotation([b.to_static(BlockChoice(cfg.num_heads, w, 1.0)).eval() for b in blocks])
        choice = BlockChoice(cfg.num_heads, w, k / n)  # tokens_kept(k / n, n) == k
        calls[("mlp", w, k)] = lambda r=statics[w], ch=choice: r.next().mlp_part(x, mods, ch)
    return calls


class _Rotation:
    """Copies of a block handed out in turn, so that consecutive timed calls do not find the weights in cache
    (in a whole forward pass every block has its own)."""

    def __init__(self, blocks: list[DiTBlock]) -> None:
        """Rotate over `blocks`."""
        self.blocks = blocks
        self.i = -1

    def next(self) -> DiTBlock:
        """The next copy."""
        self.i = (self.i + 1) % len(self.blocks)
        return self.blocks[self.i]


def validation_subnets(config: DiTConfig, space: str, count: int, seed: int,
                       exclude: set[Subnet] | None = None) -> list[tuple[str, Subnet]]:
    """`count` distinct random subnets of `space` (none of `exclude`), the ones a table is checked against."""
    chosen, rng = load_space(space), random.Random(seed)
    chosen.validate_for(config)
    out: list[tuple[str, Subnet]] = []
    seen = set(exclude or ())
    for _ in range(20 * count):
        if len(out) >= count:
            break
        subnet = chosen.sample(config, rng)
        if subnet not in seen:
            seen.add(subnet)
            out.append((f"random-{len(out) + 1}", subnet))
    return out


def calibration_subnets(config: DiTConfig, space: str, count: int, seed: int) -> list[tuple[str, Subnet]]:
    """The full model, the space's smallest subnet and random ones (`count` in all, drawn apart from the
    validation subnets' stream): the whole forwards the table's `scale` is fitted on."""
    if count <= 0:
        return []
    chosen = load_space(space)
    chosen.validate_for(config)
    out = [("calib-full", Subnet.full(config)), ("calib-smallest", chosen.smallest(config))][:count]
    extra = validation_subnets(config, space, count - len(out), seed + CALIBRATION_SEED_OFFSET, {s for _, s in out})
    return out + [(f"calib-{name}", subnet) for name, subnet in extra]


def fit_scale(table: LatencyTable, subnets: list[tuple[str, Subnet]], measured: list[float]) -> float:
    """The median over calibration subnets of measured seconds / the plain sum of their parts."""
    raw = dataclasses.replace(table, scale=1.0)
    return float(statistics.median(
        seconds / raw.predict(subnet) for (_, subnet), seconds in zip(subnets, measured, strict=True)
    ))


@torch.no_grad()
def measure_table(
    cfg: LatencyTableConfig, model: DiT, device: torch.device, subnets: list[tuple[str, Subnet]] | None = None,
    status: Callable[[str], None] | None = None,
) -> tuple[LatencyTable, list[float]]:
    """The table of `model` on `device`, and the measured seconds of each of `subnets` (timed in the same rounds)."""
    config, dtype = model.config, DTYPE_NAMES[cfg.dtype]
    ratios = cfg.token_ratios if cfg.token_ratios is not None else tuple(load_space(cfg.space).token_ratio)
    model = model.to(device).eval()
    calls = _part_calls(model, cfg.batch, device, ratios, min(cfg.copies, config.depth))
    sliced = [slice_subnet(model, s).eval() for _, s in subnets or []]
    per_round: dict[tuple[str, int, int], list[float]] = {key: [] for key in calls}
    whole: list[list[float]] = [[] for _ in sliced]
    with _autocast(device, dtype):
        for r in range(cfg.rounds):
            if status is not None:
                status(f"round {r + 1}/{cfg.rounds}: timing {len(calls)} table entries")
            for key, fn in calls.items():
                per_round[key].append(time_call(fn, device, cfg.warmup, cfg.repeats))
            for i, small in enumerate(sliced):
                if status is not None:
                    status(f"round {r + 1}/{cfg.rounds}: timing validation subnet {i + 1}/{len(sliced)}")
                whole[i].append(measure_latency(small, batch=cfg.batch, warmup=cfg.warmup, repeats=cfg.repeats,
                                                dtype=dtype))
    seconds = {key: statistics.median(v) for key, v in per_round.items()}
    table = LatencyTable(
        model=config, batch=cfg.batch, device=device.type, dtype="bfloat16" if dtype is not None else "float32",
        embed=seconds[("embed", 0, 0)], final=seconds[("final", 0, 0)],
        attn={h: s for (part, h, _), s in seconds.items() if part == "attn"},
        mlp={(w, k): s for (part, w, k), s in seconds.items() if part == "mlp"},
        settings={**asdict(cfg), "token_ratios": list(ratios)},
    )
    return table, [statistics.median(v) for v in whole]


def validate_table(table: LatencyTable, subnets: list[tuple[str, Subnet]], measured: list[float],
                   role: str = "validation") -> pd.DataFrame:
    """One row per subnet: FLOPs ratio, predicted (with and without the scale) and measured milliseconds, and
    the predictions' errors (%)."""
    config, full = table.model, closed_form_flops(table.model)
    raw = dataclasses.replace(table, scale=1.0)
    rows = []
    for (name, subnet), seconds in zip(subnets, measured, strict=True):
        predicted, unscaled = table.predict(subnet), raw.predict(subnet)
        rows.append({
            "name": name,
            "role": role,
            "subnet": subnet.describe(config),
            "flops_ratio": closed_form_flops(config, subnet) / full,
            "predicted_ms": predicted * 1e3,
            "measured_ms": seconds * 1e3,
            "error_pct": 100.0 * (predicted - seconds) / seconds,
            "unscaled_error_pct": 100.0 * (unscaled - seconds) / seconds,
        })
    return pd.DataFrame(rows, columns=["name", "role", "subnet", "flops_ratio", "predicted_ms", "measured_ms",
                                       "error_pct", "unscaled_error_pct"])


def _entries_frame(table: LatencyTable) -> pd.DataFrame:
    """Every table entry as a row: part, heads, mlp_hidden, tokens, ms."""
    rows: list[dict[str, Any]] = [{"part": "embed", "heads": None, "mlp_hidden": None, "tokens": None,
                                   "ms": table.embed * 1e3}]
    rows += [{"part": "attn", "heads": h, "mlp_hidden": None, "tokens": table.model.num_tokens, "ms": s * 1e3}
             for h, s in sorted(table.attn.items())]
    rows += [{"part": "mlp", "heads": None, "mlp_hidden": w, "tokens": k, "ms": s * 1e3}
             for (w, k), s in sorted(table.mlp.items())]
    rows.append({"part": "final", "heads": None, "mlp_hidden": None, "tokens": None, "ms": table.final * 1e3})
    return pd.DataFrame(rows)


def error_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Median and largest absolute error (%) of a frame's validation rows, and whether the median meets the target
    (calibration rows are left out: the scale was fitted on them)."""
    if "role" in frame:
        frame = frame[frame["role"] == "validation"]
    if frame.empty:
        return {"validated_subnets": 0, "median_abs_error_pct": None, "max_abs_error_pct": None, "target_met": None}
    errors = frame["error_pct"].abs()
    median = float(errors.median())
    unscaled = frame["unscaled_error_pct"].abs() if "unscaled_error_pct" in frame else errors
    return {
        "validated_subnets": len(frame),
        "median_abs_error_pct": median,
        "max_abs_error_pct": float(errors.max()),
        "mean_error_pct": float(frame["error_pct"].mean()),
        "unscaled_median_abs_error_pct": float(unscaled.median()),
        "target": f"median absolute error <= {TARGET_MEDIAN_ERROR:.0%}",
        "target_met": bool(median <= 100 * TARGET_MEDIAN_ERROR),
    }


def bench_latency_table(cfg: LatencyTableConfig, status: Callable[[str], None] | None = None) -> LatencyTableResult:
    """Measure the table on `cfg.device`, validate it against whole sliced subnets, and return both."""
    notes = ["random weights: latency does not depend on the weight values"]
    config = get_config(cfg.model, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
    calibration = calibration_subnets(config, cfg.space, cfg.calibrate, cfg.seed)
    subnets = validation_subnets(config, cfg.space, cfg.validate, cfg.seed, {s for _, s in calibration})
    with bench_run(cfg.device, cfg.threads) as run:
        torch.manual_seed(cfg.seed)
        with torch.no_grad():
            model = DiT(config)
        table, measured = measure_table(cfg, model, run.device, calibration + subnets, status)
    if calibration:
        scale = fit_scale(table, calibration, measured[:len(calibration)])
        if not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
            raise BenchError(f"the whole forwards of the calibration subnets take {scale:.2f}x the sum of their "
                             "parts: the machine's load changed while timing; measure again on a quiet machine")
        table = dataclasses.replace(table, scale=scale)
    frame = pd.concat([validate_table(table, calibration, measured[:len(calibration)], "calibration"),
                       validate_table(table, subnets, measured[len(calibration):])], ignore_index=True)
    summary = {
        "model": config.name,
        "batch": cfg.batch,
        "device": run.device.type,
        "dtype": table.dtype,
        "threads": run.threads,
        "entries": 2 + len(table.attn) + len(table.mlp),
        "full_predicted_ms": table.predict() * 1e3,
        "scale": table.scale,
        "calibration_subnets": len(calibration),
        **error_summary(frame),
    }
    table = dataclasses.replace(table, machine=run.machine, validation=summary)
    if not subnets:
        notes.append("--validate 0: the table's predictions were not checked")
    if calibration:
        notes.append(f"scale {table.scale:.4f}: fitted on {len(calibration)} calibration subnets (whole "
                     "forwards); the errors are of the other, validation subnets")
    else:
        notes.append("--calibrate 0: the prediction is the plain sum of the parts (scale 1)")
    name = f"latency-table-{run.device.type}"
    settings = {**asdict(cfg), "token_ratios": table.settings["token_ratios"]}
    return LatencyTableResult(name, frame, summary, settings, command_line("latency-table", cfg), run.machine,
                              extra={"entries": _entries_frame(table)}, notes=notes, latency_table=table)
