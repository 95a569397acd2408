"""Keep freed heap memory for reuse on the CPU training path (glibc only; a no-op elsewhere).

A CPU step allocates the same few-MB tensors every step (gradient rows, GEMM outputs, optimiser
temporaries). glibc serves blocks above its mmap threshold with fresh mmap/munmap pairs, so every
step page-faults its working set back in; measured on the 2-core box that is ~5-10% of a step.
Raising the mmap threshold and the trim threshold keeps those blocks in the heap, where the next
step reuses them. The cost: the process keeps its peak step working set (tens of MB) mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Once per process; returns whether glibc accepted the settings."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20)),  # glibc caps it at 32 MiB (64-bit)
            (_M_TRIM_THRESHOLD, mmap_threshold),
            (_M_TOP_PAD, top_pad),
        )
    )
    _done = ok
    return ok
