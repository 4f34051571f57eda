"""What a subnet costs: FLOPs in closed form and counted by fvcore, schedules' FLOPs per step, latency."""

from .flops import (
    FlopsCount,
    bucket_flops,
    closed_form_breakdown,
    closed_form_by_module,
    closed_form_flops,
    closed_form_params,
    count_flops,
    flops_per_step,
    format_flops,
    mean_flops,
    parse_budget,
    step_flops,
)
from .latency import measure_latency, measure_schedule_latency
from .query import FlopsQuery, FlopsReport, registry_rows, run_flops_query

__all__ = [
    "FlopsCount",
    "FlopsQuery",
    "FlopsReport",
    "bucket_flops",
    "closed_form_breakdown",
    "closed_form_by_module",
    "closed_form_flops",
    "closed_form_params",
    "count_flops",
    "flops_per_step",
    "format_flops",
    "mean_flops",
    "measure_latency",
    "measure_schedule_latency",
    "parse_budget",
    "registry_rows",
    "run_flops_query",
    "step_flops",
]
