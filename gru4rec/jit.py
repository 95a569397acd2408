"""Numba pieces of the core: the dropout mask generator (gru4rec/dropout.py) and the thread count
every numba loop of the package runs on. Imported only by CPU training, so scoring, exporting and
the GPU never load numba."""

from __future__ import annotations

import numba
import torch
from numba import njit, prange, uint64

_GOLDEN = uint64(0x9E3779B97F4A7C15)


_synced = (0, 1)  # (torch's thread count numba was last matched to, numba's count)


def use_torch_threads() -> int:
    """Numba's loops run on as many threads as torch (`--threads`), within numba's pool; returns
    that count (numba.get_num_threads is too costly a call to make on every step).

    With the omp layer numba shares torch's OpenMP runtime, and starting numba's pool (the first
    numba.get_num_threads) or setting its count resets that runtime's count: torch's is restored
    after. Called before every loop, so a count already matched returns at once.
    """
    global _synced
    n = torch.get_num_threads()
    if n == _synced[0]:
        return _synced[1]
    m = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != m:
        numba.set_num_threads(m)
    torch.set_num_threads(n)
    _synced = (n, m)
    return m


@njit(nogil=True, cache=True, parallel=True)
def fill_mask(out, seed, keep24, scale):
    """out[i] = scale if splitmix64(seed + i) >> 40 < keep24 else 0 (out: 1-D)."""
    n = out.shape[0]
    for b in prange((n + 4095) // 4096):  # blocks: one thread's share is a run of whole cache lines
        for i in range(b * 4096, min(n, b * 4096 + 4096)):
            z = seed + uint64(i) * _GOLDEN
            z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
            z = z ^ (z >> uint64(31))
            out[i] = scale if (z >> uint64(40)) < keep24 else 0.0
