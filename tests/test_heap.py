"""The CPU heap policy: freed big blocks stay mapped (no page faults next step) unless opted out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = str(Path(__file__).resolve().parent.parent / "platform")
PROBE = """
import sys
sys.path.insert(0, {platform!r})
import numpy as np
from mfcon.train.heap import keep_freed_memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

applied = keep_freed_memory()
block = np.ones(64 * 2**20 // 8)  # 64 MiB, above glibc's largest mmap threshold
held = rss_mib()
del block
print(applied, round(held - rss_mib()))  # MiB given back to the OS by the free
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is glibc's mallopt")


def _probe(env: dict[str, str]) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(platform=PLATFORM)], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_stays_mapped_with_the_policy():
    applied, returned = _probe({"MFCON_CPU_HEAP": "keep"})
    assert applied and returned < 8


def test_opting_out_leaves_malloc_as_it_comes():
    applied, returned = _probe({"MFCON_CPU_HEAP": "default"})
    assert not applied and returned > 56
