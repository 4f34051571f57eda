"""What every search worker builds once from a SearchConfig: the supernet, the space, the proxy and the budget.

Two objectives, both minimised: the quality proxy (:mod:`dynasearch.search.proxy`) and the closed-form GFLOPs,
with the FLOPs budget parsed against the full model. Every input is checked here, with clear errors, before a
search writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.native import load_checkpoint, read_config
from ..cost.flops import closed_form_flops, format_flops, parse_budget
from ..cost.latency_table import LatencyTable
from ..device import resolve_device
from ..diffusion.factory import diffusion_for
from ..errors import BudgetError, SearchError
from ..model.dit import DiT
from ..model.subnet import Subnet
from ..space import DEFAULT_SPACE, SearchSpace, load_space
from .config import SearchConfig, training_space
from .latency_budget import latency_settings, load_latency_budget
from .proxy import (
    SPLITTABLE_PROXIES,
    ProxyEvaluator,
    ProxySet,
    build_proxy_set,
    dataset_from_run_config,
)

__all__ = ["SearchContext", "prepare_search", "subnet_params"]


@dataclass
class SearchContext:
    """What every worker builds once: the supernet, the space, the proxy evaluator and the budget."""

    config: SearchConfig
    model: DiT
    space: SearchSpace
    train_space: SearchSpace | None
    evaluator: ProxyEvaluator
    budget: int
    full_flops: int
    min_flops: int
    settings: dict[str, Any] = field(default_factory=dict)
    latency_table: LatencyTable | None = None  # with --latency: the table that predicts a subnet's latency
    latency_budget: float | None = None  # seconds

    @property
    def groups(self) -> list[list[int]]:
        """Block indices per decision group."""
        return self.space.groups(self.model.config)

    def subnet_from_params(self, params: dict[str, Any]) -> Subnet:
        """The subnet a trial's parameters describe."""
        n = len(self.groups)
        return self.space.subnet(
            self.model.config,
            [params[f"attn_{g}"] for g in range(n)],
            [params[f"mlp_{g}"] for g in range(n)],
            [params[f"tok_{g}"] for g in range(n)],
        )

    def flops(self, subnet: Subnet) -> int:
        """Closed-form FLOPs of a subnet (batch 1)."""
        return closed_form_flops(self.model.config, subnet)


def subnet_params(n_groups: int, attn: list[float], mlp: list[float], tok: list[float]) -> dict[str, float]:
    """Optuna parameters of per-group rates."""
    params: dict[str, float] = {}
    for g in range(n_groups):
        params[f"attn_{g}"], params[f"mlp_{g}"], params[f"tok_{g}"] = attn[g], mlp[g], tok[g]
    return params


def prepare_search(config: SearchConfig, proxy: ProxySet | None = None) -> SearchContext:
    """Load the supernet and its data, resolve the space and the budget (raising clear errors).

    `proxy`: the proxy set another worker of this search already built, with its teacher's cache (skips loading
    the dataset and the teacher's forwards).
    """
    doc = read_config(config.supernet)
    model = load_checkpoint(config.supernet, device=resolve_device(config.device))
    if model.config.is_sliced:
        raise SearchError(f"'{config.supernet}' is a sliced model; search needs a supernet (a training run directory)")
    train_space = training_space(config.supernet, doc)
    space = load_space(config.space) if config.space is not None else train_space or load_space(DEFAULT_SPACE)
    space.validate_for(model.config)
    if train_space is not None:
        space.check_trained_on(train_space)
    if space.timestep_aware and config.proxy not in SPLITTABLE_PROXIES:
        raise SearchError(
            f"--proxy {config.proxy} scores whole sampling trajectories and cannot be split by timestep bucket "
            f"(space '{space.label}' has timestep_buckets); use one of {', '.join(SPLITTABLE_PROXIES)}"
        )
    full = closed_form_flops(model.config, Subnet.full(model.config))
    budget = parse_budget(config.flops, full) if config.flops is not None else full  # None: no FLOPs budget
    latency = load_latency_budget(config, model.config, space) if config.latency is not None else None
    smallest = closed_form_flops(model.config, space.smallest(model.config))
    if budget < smallest:
        raise BudgetError(
            f"FLOPs budget '{config.flops}' ({format_flops(budget)}) is below the smallest subnet of space "
            f"'{space.name}', {format_flops(smallest)} ({smallest / full:.1%} of the full model)"
        )
    if proxy is None:
        split = dataset_from_run_config(doc)
        diffusion = diffusion_for(model.config)
        proxy = build_proxy_set(split.val_x, split.val_y, diffusion, num=config.proxy_samples, seed=config.seed)
    settings = {
        "supernet": str(config.supernet),
        "model": model.config.name,
        "space": space.to_dict(),
        "budget_flops": budget,
        "budget": config.flops,
        "full_flops": full,
        "proxy_samples": config.proxy_samples,
        "proxy_seed": config.seed,
        "proxy": config.proxy,  # studies made before proxy kinds lack it: they were eps (study._check_settings)
    }
    if latency is not None:  # absent in FLOPs-only studies, as before latency budgets
        settings.update(latency_settings(config, *latency))
    evaluator = ProxyEvaluator(model, proxy, kind=config.proxy)  # computes the teacher's cache once
    table, latency_budget = latency if latency is not None else (None, None)
    return SearchContext(config, model, space, train_space, evaluator, budget, full, smallest, settings, table,
                         latency_budget)
