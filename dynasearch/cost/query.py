"""Cost reports of models and subnets (FLOPs both ways, parameters): what `dynasearch flops` and `models` print."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.native import load_checkpoint, read_config, read_schedule
from ..diffusion.factory import diffusion_for
from ..errors import ConfigError, SubnetError
from ..model.config import DIT_CONFIGS, DiTConfig, get_config
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule, load_subnet_or_schedule
from ..model.subnet import Subnet
from .flops import (
    closed_form_by_module,
    closed_form_flops,
    closed_form_params,
    count_flops,
)

__all__ = ["FlopsQuery", "FlopsReport", "registry_rows", "run_flops_query"]


@dataclass(frozen=True)
class FlopsQuery:
    """What to count: a registry model (with data sizes) or a checkpoint, and optionally a subnet."""

    model: str | None = None
    checkpoint: Path | None = None
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    subnet_file: Path | None = None
    attn_rate: float | None = None
    mlp_rate: float | None = None
    token_ratio: float | None = None
    batch: int = 1
    sample_steps: int = 50  # timestep schedules: the DDIM run their mean FLOPs per step is taken over


@dataclass
class FlopsReport:
    """FLOPs by fvcore and by the closed form, parameters, and the per-module figures of both."""

    model: str
    config: DiTConfig
    subnet: Subnet
    flops: int
    flops_closed_form: int
    params: int
    batch: int
    by_module_fvcore: dict[str, int] = field(default_factory=dict)
    by_module_closed_form: dict[str, int] = field(default_factory=dict)
    schedule: SubnetSchedule | None = None
    bucket_rows: list[dict[str, Any]] = field(default_factory=list)  # per timestep bucket, for schedules

    @property
    def gflops(self) -> float:
        """fvcore GFLOPs."""
        return self.flops / 1e9

    @property
    def gflops_closed_form(self) -> float:
        """Closed-form GFLOPs."""
        return self.flops_closed_form / 1e9

    @property
    def subnet_description(self) -> str:
        """Mean rates of the subnet."""
        return self.subnet.describe(self.config.supernet())

    def module_rows(self) -> dict[str, tuple[int, int]]:
        """(fvcore, closed form) for the top-level modules and blocks."""
        names = [k for k in self.by_module_closed_form
                 if k and (k.count(".") == 0 or (k.startswith("blocks.") and k.count(".") == 1))]
        return {k: (self.by_module_fvcore.get(k, 0), self.by_module_closed_form[k]) for k in names}

    def to_dict(self, by_module: bool = False) -> dict[str, Any]:
        """JSON form with the keys model, gflops, gflops_closed_form, params (and more)."""
        out: dict[str, Any] = {
            "model": self.model,
            "input_size": self.config.input_size,
            "in_channels": self.config.in_channels,
            "num_classes": self.config.num_classes,
            "batch": self.batch,
            "gflops": self.gflops,
            "gflops_closed_form": self.gflops_closed_form,
            "flops": self.flops,
            "flops_closed_form": self.flops_closed_form,
            "params": self.params,
            "subnet": self.subnet.to_dict(),
        }
        if self.schedule is not None:
            out["schedule"] = self.schedule.to_dict()
            out["buckets"] = self.bucket_rows
            out["gflops_per_step"] = out.pop("gflops")
            out["gflops_closed_form_per_step"] = out.pop("gflops_closed_form")
        if by_module:
            out["by_module"] = {k: {"fvcore": fv, "closed_form": cf} for k, (fv, cf) in self.module_rows().items()}
        return out


def _build(query: FlopsQuery) -> DiT:
    if query.checkpoint is not None:
        return load_checkpoint(query.checkpoint)
    assert query.model is not None
    config = get_config(
        query.model, input_size=query.input_size, in_channels=query.in_channels, num_classes=query.num_classes
    )
    with torch.no_grad():
        return DiT(config).eval()


def _subnet(query: FlopsQuery, model: DiT) -> Subnet | SubnetSchedule:
    if query.subnet_file is not None:
        subnet = load_subnet_or_schedule(query.subnet_file)
        try:
            subnet.validate(model.config)
        except SubnetError as exc:
            raise SubnetError(f"subnet file '{query.subnet_file}': {exc}") from None
        return subnet
    rates = (query.attn_rate, query.mlp_rate, query.token_ratio)
    if all(r is None for r in rates):
        if query.checkpoint is not None:
            schedule = read_schedule(read_config(query.checkpoint), model.config, query.checkpoint)
            if schedule is not None:
                return schedule
        return model.subnet
    if model.config.is_sliced:
        raise ConfigError("rates apply to supernets; this checkpoint is a sliced model (give --subnet instead)")
    a, m, t = (1.0 if r is None else r for r in rates)
    return Subnet.uniform(model.config, a, m, t)


def run_flops_query(query: FlopsQuery) -> FlopsReport:
    """Count FLOPs (fvcore and closed form) and parameters for a query; schedules per bucket and per step."""
    model = _build(query)
    model.config.check_batch(query.batch, "--batch")
    subnet = _subnet(query, model)
    if isinstance(subnet, SubnetSchedule):
        return _schedule_report(query, model, subnet)
    counted = count_flops(model, subnet, batch=query.batch)
    return FlopsReport(
        model=model.config.name,
        config=model.config,
        subnet=subnet,
        flops=counted.total,
        flops_closed_form=closed_form_flops(model.config, subnet, batch=query.batch),
        params=closed_form_params(model.config, subnet),
        batch=query.batch,
        by_module_fvcore=counted.by_module,
        by_module_closed_form=closed_form_by_module(model.config, subnet, batch=query.batch),
    )


def _schedule_report(query: FlopsQuery, model: DiT, schedule: SubnetSchedule) -> FlopsReport:
    """Every bucket counted both ways; the totals are means per denoising step of a `sample_steps` DDIM run."""
    if not 1 <= query.sample_steps <= 1000:
        raise ConfigError(f"--sample-steps must be in [1, 1000], got {query.sample_steps}")
    timesteps = diffusion_for(model.config).timestep_schedule(query.sample_steps)
    counts = schedule.buckets.step_counts(timesteps)
    rows = []
    for k, subnet in enumerate(schedule.subnets):
        rows.append({
            "bucket": k, "timesteps": schedule.buckets.label(k), "steps": counts[k],
            "flops": count_flops(model, subnet, batch=query.batch).total,
            "flops_closed_form": closed_form_flops(model.config, subnet, batch=query.batch),
            "subnet": subnet.describe(model.config.supernet()),
        })
    n = len(timesteps)
    return FlopsReport(
        model=model.config.name,
        config=model.config,
        subnet=schedule.union(),
        flops=round(sum(r["flops"] * r["steps"] for r in rows) / n),
        flops_closed_form=round(sum(r["flops_closed_form"] * r["steps"] for r in rows) / n),
        params=closed_form_params(model.config, schedule.union()),
        batch=query.batch,
        schedule=schedule,
        bucket_rows=rows,
    )


def registry_rows(input_size: int = 32, in_channels: int = 4, num_classes: int = 1000) -> list[dict[str, Any]]:
    """One row per registry model: sizes, parameters (without routers, as DiT reports) and closed-form GFLOPs."""
    rows = []
    for name in DIT_CONFIGS:
        config = get_config(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        rows.append(
            {
                "model": name,
                "depth": config.depth,
                "hidden_size": config.hidden_size,
                "num_heads": config.num_heads,
                "patch_size": config.patch_size,
                "tokens": config.num_tokens,
                "params": closed_form_params(config, routers=False),
                "params_with_routers": closed_form_params(config),
                "gflops": closed_form_flops(config) / 1e9,
            }
        )
    return rows
