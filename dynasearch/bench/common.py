"""What every benchmark shares: the config base and its checks, where it runs (device, threads, the machine
record), the result type, the command line that reproduces it and the files written."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..checks import check_memory, check_seed, disk_full, is_disk_full
from ..device import machine_info, resolve_device
from ..errors import DynasearchError
from ..fileio import atomic_write_text, kept_on_failure, removed_on_failure
from ..model.config import DIT_CONFIGS, get_config
from ..search.config import PROXY_BYTES_PER_SAMPLE

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "BenchRun",
    "bench_run",
    "check_positive",
    "command_line",
    "machine_info",
    "resolve_device",
    "torch_threads",
    "write_bench",
]


class BenchError(DynasearchError):
    """A benchmark that cannot run with the options given."""


@dataclass
class BenchResult:
    """One benchmark's main table, its extra tables, a summary (target met or not) and how it was made."""

    name: str  # file stem: latency-cpu, flops, search, ranking, train-cpu
    table: pd.DataFrame  # written as NAME.csv and printed
    summary: dict[str, Any]  # headline figures, written into NAME.json
    settings: dict[str, Any]  # the config, written into NAME.json
    command: str  # a command line that reproduces the run
    machine: dict[str, Any]
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)  # written as NAME_KEY.csv
    notes: list[str] = field(default_factory=list)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _flag_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    text = str(value)
    return f"'{text}'" if any(c.isspace() for c in text) or not text else text


def command_line(sub: str, config: Any, **overrides: Any) -> str:
    """`dynasearch bench SUB --field value ...` for every set field of a config dataclass (defaults spelled out);
    `overrides` replace a field's value as written (e.g. models="all")."""
    parts = ["dynasearch", "bench", sub]
    for f in dataclasses.fields(config):
        value = overrides.get(f.name, getattr(config, f.name))
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            continue
        text = _flag_value(value)
        if text is not None:
            parts += [flag, text]
    return " ".join(parts)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for a block (None: leave them) and restore them afterwards; yields the count."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def check_positive(**values: int | float | None) -> None:
    """Raise BenchError naming the first option that is not a positive number."""
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BenchError(f"--{key.replace('_', '-')} must be positive, got {value!r}")


class BenchConfig:
    """Base of every benchmark config (frozen dataclasses that keep their own fields, in their own order, since
    that order is the one of the recorded settings and command line): the checks their `__post_init__` runs."""

    def check_positive(self, *names: str) -> None:
        """Raise BenchError naming the first of the fields `names` that is not a positive number (None passes)."""
        check_positive(**{name: getattr(self, name) for name in names})

    def check_non_negative(self, *names: str) -> None:
        """Raise BenchError naming the first of the fields `names` that is below 0."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BenchError(f"--{name.replace('_', '-')} must be a finite number of 0 or more, got {value!r}")
            if value < 0:
                raise BenchError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")

    def check_seed(self) -> None:
        """Raise BenchError unless the `seed` field is an integer in [0, 2**32 - 1]."""
        check_seed(self.seed, "--seed", BenchError)  # type: ignore[attr-defined]  # the configs that take a --seed

    def check_proxy_memory(self, *names: str) -> None:
        """Raise BenchError naming the first field of `names` (proxy-set sizes) whose set alone cannot fit in memory."""
        for name in names:
            value = getattr(self, name)
            check_memory(value * PROXY_BYTES_PER_SAMPLE, f"--{name.replace('_', '-')} {value}", BenchError)

    def check_registry_model(self, name: str, batch: int, option: str = "--batch") -> None:
        """Raise a ConfigError (naming the option) when registry model `name` at this config's input_size,
        in_channels and num_classes, or one forward pass of `batch`, cannot fit in memory."""
        if name not in DIT_CONFIGS:
            return  # the unknown name is reported by the caller's own check
        config = get_config(name, input_size=self.input_size, in_channels=self.in_channels,  # type: ignore[attr-defined]
                            num_classes=self.num_classes)  # type: ignore[attr-defined]
        config.check_memory()
        config.check_batch(batch, option)

    def check_device(self) -> None:
        """Raise BenchError unless the `device` field is cpu or cuda."""
        device = self.device  # type: ignore[attr-defined]  # the configs that take a --device
        if device not in ("cpu", "cuda"):
            raise BenchError(f"--device must be cpu or cuda, got '{device}'")


@dataclass(frozen=True)
class BenchRun:
    """Where a benchmark runs: the device, torch's intra-op thread count and the machine record."""

    device: torch.device
    threads: int
    machine: dict[str, Any]


@contextmanager
def bench_run(device: str | torch.device, threads: int | None) -> Iterator[BenchRun]:
    """Resolve the device, set torch's threads for the block (restored afterwards) and record the machine."""
    resolved = resolve_device(device)
    with torch_threads(threads) as count:
        yield BenchRun(resolved, count, machine_info(resolved))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_bench(
    result: BenchResult, out: str | Path, plot: Callable[[BenchResult, Path], Path] | None = None
) -> list[Path]:
    """Write NAME.csv (+ NAME_KEY.csv per extra table), NAME.png (when a plotter is given) and the NAME.json sidecar."""
    out = Path(out)
    with removed_on_failure(out):  # a new output directory is not left behind empty or half-written
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(out) from None
            raise BenchError(f"output directory '{out}' cannot be created: {exc.strerror}") from None
        with kept_on_failure(out):  # a failed write leaves the previous results as they were
            return _write_files(result, out, plot)


def _write_files(result: BenchResult, out: Path, plot: Callable[[BenchResult, Path], Path] | None) -> list[Path]:
    """The files of :func:`write_bench` into the existing directory `out`."""
    files = [out / f"{result.name}.csv"]
    atomic_write_text(files[0], result.table.to_csv(index=False))
    for key, df in result.extra.items():
        path = out / f"{result.name}_{key}.csv"
        atomic_write_text(path, df.to_csv(index=False))
        files.append(path)
    if plot is not None:
        files.append(plot(result, out / f"{result.name}.png"))
    sidecar = out / f"{result.name}.json"
    files.append(sidecar)
    doc = {
        "bench": result.name,
        "command": f"{result.command} --out {_flag_value(str(out))}",
        "date": result.date,
        "machine": result.machine,
        "settings": result.settings,
        "summary": result.summary,
        "notes": result.notes,
        "files": [p.name for p in files],
    }
    atomic_write_text(sidecar, json.dumps(_jsonable(doc), indent=2) + "\n")
    return files
