"""Give freed memory back to the OS, so a process that reads its input in chunks stays flat.

Two allocators hold a chunk's memory: Polars' jemalloc (frames) and glibc's malloc (NumPy arrays).
Polars configures jemalloc to keep freed pages mapped for good (`muzzy_decay_ms:-1`), and glibc
keeps freed heap pages until trimmed; either way the next chunk lands on new pages and the peak
grows by about a chunk. `configure()` (before Polars is first imported) makes jemalloc return
freed pages at once; `release()` (between chunks) trims glibc's heap. Measured by
`gru4rec-cli bench score-memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

VAR = "_RJEM_MALLOC_CONF"  # Polars reads it when first imported, after its own settings: the last wins
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"


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
    """Return glibc's free heap pages to the OS (a no-op where malloc_trim does not exist)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None
