"""Keep a CPU training process's freed memory mapped, so big activations stop page-faulting every step.

glibc serves every block above its mmap threshold (at most 32 MiB) with its own
``mmap`` and unmaps it on free, so each large activation of every step faults
its pages in again and the kernel zeroes them: 10-20% of a CPU training step
(docs/performance.md, "What limits a CPU step"). With ``M_MMAP_MAX = 0`` and
``M_TRIM_THRESHOLD = -1`` (documented: -1 disables trimming) the heap keeps
them; the process holds on to its peak footprint instead, which a training
process reaches every step anyway. ``MFCON_CPU_HEAP=default`` leaves malloc as
it comes.
"""

from __future__ import annotations

import ctypes
import os
import platform

HEAP_ENV = "MFCON_CPU_HEAP"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>


def keep_freed_memory() -> bool:
    """Apply the policy to this process (it cannot be undone); False where libc is not glibc or opted out."""
    if os.environ.get(HEAP_ENV, "keep") == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
