"""What every benchmark prints beside its ratios: the machine, its load, and the versions that ran."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    return model


def machine_facts(*packages: str) -> dict[str, object]:
    """CPU model, logical CPUs, 1-minute load average, Python, and ``packages``' versions (imported here)."""
    facts: dict[str, object] = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                                "load_average_1m": round(os.getloadavg()[0], 2),
                                "python": platform.python_version()}
    for name in packages:
        facts[name] = getattr(importlib.import_module(name), "__version__", "?")
    return facts
