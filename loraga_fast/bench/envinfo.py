"""Versions and hardware of the machine a benchmark ran on, for the JSON results: :func:`environment_info`."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch

from .. import __version__
from .workloads import resolve_device

__all__ = ["environment_info"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    """An installed package's version from its metadata (importing transformers and peft only for their versions
    would cost a runner seconds), else from the module itself; None when absent."""
    from importlib import import_module, metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        try:
            return str(getattr(import_module(name), "__version__", None))
        except ImportError:
            return None


def environment_info(device: str | torch.device = "auto") -> dict[str, Any]:
    """Versions and hardware, for the JSON results."""
    dev = resolve_device(device)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "loraga_fast": __version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "total_memory_bytes": psutil.virtual_memory().total,
        "loraga_fast_backend": os.environ.get("LORAGA_FAST_BACKEND", "auto"),
    }
