"""The one place a `--device` option (auto | cpu | cuda[:N]) becomes a torch.device, and the record of the machine
every measurement is written with (:func:`machine_info`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["machine_info", "resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; an unknown name, or 'cuda' without CUDA, is a ConfigError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available here; use --device cpu or auto")
    return device


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch version, intra-op threads and the device name, as recorded with every benchmark."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
