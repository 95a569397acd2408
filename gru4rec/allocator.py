"""How the process's allocators hand memory back to the OS (glibc and Polars' jemalloc; Linux).

Scoring reads its input in chunks: two allocators hold a chunk's memory, Polars' jemalloc (frames)
and glibc's malloc (NumPy arrays). Polars configures jemalloc to keep freed pages mapped, and glibc
keeps freed heap pages until trimmed; either way the next chunk lands on new pages and the peak
grows by about a chunk. `configure()` (before Polars is first imported) makes jemalloc return freed
pages at once; `release()` (between chunks) trims glibc's heap. Measured by
`gru4rec-cli bench score-memory`.

Training on the CPU wants the opposite: a step allocates the same few-MB tensors every step, and
glibc serves blocks above its mmap threshold with fresh mmap/munmap pairs, so every step would
page-fault its working set back in, a measurable share of a step. `keep_freed_memory()`
raises the mmap and trim thresholds so those blocks stay in the heap for the next step; the cost is
the step's peak working set (tens of MB) kept mapped. An explicit `release()` still trims.
`available_memory()` is what the kernel could hand out now (scoring's budget, training's check).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

VAR = "_RJEM_MALLOC_CONF"  # Polars reads it when first imported, after its own settings: the last wins
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_kept = False


def configure() -> None:
    """Append our jemalloc settings to the variable, unless they already end it. Appended, not set
    by default: a parent that imported Polars first has written Polars' own defaults into it, and
    its children (Ray workers, benchmark runs) inherit them. GRU4REC_JEMALLOC_CONF replaces ours
    (empty: leave the variable alone)."""
    ours = os.environ.get("GRU4REC_JEMALLOC_CONF", JEMALLOC_CONF)
    current = os.environ.get(VAR, "")
    if ours and not current.endswith(ours):
        os.environ[VAR] = f"{current},{ours}" if current else ours


def release() -> None:
    """Return glibc's free heap pages to the OS (a no-op without glibc)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory(mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Once per process; returns whether glibc accepted the settings."""
    global _kept
    libc = _glibc()
    if _kept or libc is None:
        return _kept
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20)),  # glibc caps it at 32 MiB (64-bit)
            (_M_TRIM_THRESHOLD, mmap_threshold),
            (_M_TOP_PAD, top_pad),
        )
    )
    return _kept


@functools.cache
def _glibc():
    """The C library when it is glibc (has mallopt and malloc_trim), else None (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def gpu_free_memory() -> int | None:
    """Free memory of the first visible GPU (bytes), None where it cannot be read. nvidia-smi first:
    asking torch would create a CUDA context (hundreds of MB of the GPU) in the scoring process."""
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    smi = shutil.which("nvidia-smi")
    if smi is not None and visible != "-1":
        cmd = [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", visible or "0"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
            return int(out.split()[0]) << 20  # MiB
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(0)[0])
    except Exception:
        pass
    return None
