"""The search-space file format: YAML text, the keys of its mapping, and the rule each field follows.

A search space is a small YAML file, read with ``yaml.safe_load``; unknown keys are an error::

    name: blockwise            # optional, defaults to the file name without .yaml
    granularity: block         # global | stage | block: which blocks share one decision
    stages: 4                  # granularity stage only: groups of consecutive blocks, split as evenly as
                               # possible, earlier stages get the extra block (10 blocks / 4 -> 3, 3, 2, 2)
    stage_sizes: [3, 3, 3, 3]  # granularity stage only, instead of stages: blocks per stage (sums to depth)
    attn_rate: [0.25, 0.5, 0.75, 1.0]   # fractions of the full model's attention heads
    mlp_rate: [0.25, 0.5, 0.75, 1.0]    # fractions of the full MLP width
    token_ratio: [0.5, 0.75, 1.0]       # fraction of tokens through the MLP (< 1 needs token selection)
    timestep_buckets: 4        # optional: a timestep-aware space, one configuration per range of timesteps
                               # (K equal ranges of [0, T), or inner boundaries such as [250, 500, 750])

``granularity``, ``attn_rate``, ``mlp_rate`` and ``token_ratio`` are required; a stage space needs exactly one of
``stages`` / ``stage_sizes``, other spaces accept neither. Each choice list holds distinct numbers in (0, 1]
and is stored sorted. Every message names the space (its file, or its name), the key and the value that is wrong.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import yaml

from ..errors import SearchSpaceError

__all__ = [
    "DIMENSIONS",
    "GRANULARITIES",
    "KEYS",
    "NO_FILE",
    "REQUIRED",
    "bucket_spec",
    "check_mapping",
    "choice_list",
    "format_choices",
    "positive_int",
    "read_yaml",
    "same_choice",
    "space_error",
]

GRANULARITIES = ("global", "stage", "block")
DIMENSIONS = ("attn_rate", "mlp_rate", "token_ratio")
KEYS = ("name", "granularity", "stages", "stage_sizes", *DIMENSIONS, "timestep_buckets")
REQUIRED = ("granularity", *DIMENSIONS)
NO_FILE = "<dict>"
"""The `source` of a space built from a mapping rather than read from a file."""
_TOL = 1e-9


def space_error(label: str, message: str) -> SearchSpaceError:
    """A SearchSpaceError prefixed with the space's file or name."""
    return SearchSpaceError(f"search space '{label}': {message}")


def same_choice(a: float, b: float) -> bool:
    """Two choice values are the same number (up to float noise)."""
    return math.isclose(a, b, rel_tol=0.0, abs_tol=_TOL)


def format_choices(values: Sequence[float]) -> str:
    """Comma-separated values, e.g. '0.25, 0.5, 1.0'."""
    return ", ".join(str(v) for v in values)


def choice_list(label: str, key: str, value: Any) -> tuple[float, ...]:
    """Validate one choice list and return it as a sorted tuple of floats."""
    if not isinstance(value, (list, tuple)):
        raise space_error(label, f"{key} must be a list of numbers in (0, 1], got {value!r}")
    if not value:
        raise space_error(label, f"{key} is an empty list; give at least one number in (0, 1]")
    out: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise space_error(label, f"{key} has value {item!r} which is not a number")
        number = float(item)
        if not 0.0 < number <= 1.0:  # also rejects nan
            raise space_error(label, f"{key} has value {item!r} outside (0, 1]")
        if any(same_choice(number, seen) for seen in out):
            raise space_error(label, f"{key} has duplicate value {item!r}")
        out.append(number)
    return tuple(sorted(out))


def positive_int(label: str, key: str, value: Any) -> int:
    """Validate a positive integer field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise space_error(label, f"{key} has value {value!r}; it must be a positive integer")
    return value


def bucket_spec(label: str, value: Any) -> int | tuple[int, ...]:
    """Validate `timestep_buckets`: a positive count, or a strictly increasing list of positive boundaries."""
    if isinstance(value, int) and not isinstance(value, bool):
        return positive_int(label, "timestep_buckets", value)
    if isinstance(value, (list, tuple)) and value:
        bounds = tuple(positive_int(label, "timestep_buckets", v) for v in value)
        if any(lo >= hi for lo, hi in itertools.pairwise(bounds)):
            raise space_error(label, f"timestep_buckets boundaries {list(bounds)} must increase strictly")
        return bounds
    raise space_error(
        label, f"timestep_buckets has value {value!r}; give a count (e.g. 4) or inner boundaries (e.g. [250, 500, 750])"
    )


def check_mapping(data: Any, source: str = NO_FILE) -> None:
    """Raise SearchSpaceError unless `data` is a mapping with only known keys and every required one."""
    name = data.get("name") if isinstance(data, dict) else None
    label = source if source != NO_FILE else (name if isinstance(name, str) and name else NO_FILE)
    if not isinstance(data, dict):
        found = "an empty document" if data is None else f"a {type(data).__name__}"
        raise space_error(label, f"expected a mapping with keys {', '.join(KEYS)}; found {found}")
    unknown = [str(k) for k in data if k not in KEYS]
    if unknown:
        raise space_error(label, f"unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise space_error(label, f"missing required key(s) {', '.join(missing)}")


def read_yaml(text: str, source: str) -> Any:
    """The document in YAML `text`; a syntax error names `source` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None and context_mark is not mark:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise space_error(source, f"not valid YAML{where}: {problem}") from None
