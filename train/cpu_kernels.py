"""Numba loops for the CPU step's Adagrad updates (spec §6): one pass where ATen needs a dozen.

On a CPU the item-table update is the step's largest cost after the output GEMMs, and not for its
arithmetic: ATen spends it in a dozen separate ops (index_add_ per table, index_select of the
accumulator and velocity rows, one elementwise pass per operator), each a dispatch and a walk over
the touched rows (2.0 ms for 1,400 rows of 100 on the 2-core box). `adagrad_rows` sums duplicate
rows and applies the update row by row in one loop (0.19 ms); `adagrad_dense` does the same for the
GRU weights. Compiled once per machine (numba's on-disk cache).

Update (official IndexedAdagradM): a <- a + g^2; d = -lr g / sqrt(a + eps); with momentum mu > 0,
v <- mu v + d and theta <- theta + v; else theta <- theta + d. Scalars come in the tables' dtype, so
float32 tables are updated in float32 as ATen does.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _update_row(p, acc, vel, g, r, denom, lr, mu, eps):
    """Row r of the update (g: the gradient, same shape); denom is a work row."""
    # two loops, not one: LLVM vectorises the sqrt only when it is split from the stores
    for j in range(p.shape[1]):
        a = acc[r, j] + g[r, j] * g[r, j]
        acc[r, j] = a
        denom[j] = np.sqrt(a + eps)
    if mu > 0:
        for j in range(p.shape[1]):
            v = vel[r, j] * mu - lr * (g[r, j] / denom[j])
            vel[r, j] = v
            p[r, j] += v
    else:
        for j in range(p.shape[1]):
            p[r, j] -= lr * (g[r, j] / denom[j])


@njit(nogil=True, error_model="numpy", cache=True)
def _add_rows(scratch, seen, order, n, idx, g):
    """scratch[idx[i]] += g[i]; rows met for the first time are appended to order[n:]."""
    for i in range(idx.shape[0]):
        r = idx[i]
        if not seen[r]:
            seen[r] = True
            order[n] = r
            n += 1
        for j in range(scratch.shape[1]):
            scratch[r, j] += g[i, j]
    return n


@njit(nogil=True, error_model="numpy", cache=True)
def _adagrad_rows(table, acc, vel, scratch, seen, order, idx_a, g_a, idx_b, g_b, lr, mu, eps):
    n = _add_rows(scratch, seen, order, 0, idx_a, g_a)
    n = _add_rows(scratch, seen, order, n, idx_b, g_b)
    denom = np.empty(table.shape[1], table.dtype)
    for k in range(n):
        r = order[k]
        _update_row(table, acc, vel, scratch, r, denom, lr, mu, eps)
        for j in range(table.shape[1]):
            scratch[r, j] = 0
        seen[r] = False


@njit(nogil=True, error_model="numpy", cache=True)
def _adagrad_2d(p, g, acc, vel, lr, mu, eps):
    denom = np.empty(p.shape[1], p.dtype)
    for r in range(p.shape[0]):
        _update_row(p, acc, vel, g, r, denom, lr, mu, eps)


def _np(t, out: bool = False) -> np.ndarray:
    """The tensor's memory as an array (no copy); an array written to must be contiguous."""
    a = t.detach().numpy()
    if out and not a.flags.c_contiguous:
        raise ValueError("Adagrad state must be contiguous")
    return a


def adagrad_rows(table, acc, vel, scratch, seen, order, parts, lr: float, mu: float, eps: float) -> None:
    """Adagrad on the rows of `table` listed in parts = [(idx, grad_rows), ...] (one or two parts),
    duplicates summed first (in the parts' order). Work buffers, left as they were found: scratch
    (zeros like table), seen (bool array, False) and order (int64 array), one entry per table row.
    vel is unused when mu = 0."""
    ia, ga = parts[0]
    ib, gb = parts[1] if len(parts) > 1 else (ia[:0], ga[:0])
    t = _np(table, out=True)
    dt = t.dtype.type
    _adagrad_rows(
        t, _np(acc, out=True), _np(vel, out=True), _np(scratch, out=True), seen, order,
        _np(ia), _np(ga), _np(ib), _np(gb), dt(lr), dt(mu), dt(eps),
    )  # fmt: skip


def adagrad_dense(p, g, acc, vel, lr: float, mu: float, eps: float) -> None:
    """Adagrad on a whole parameter; vel is unused when mu = 0."""
    x = _np(p, out=True)
    shape = (len(x), -1) if x.ndim > 1 else (1, -1)  # rows of a matrix, a vector as one row
    dt = x.dtype.type
    a, v = (_np(t, out=True).reshape(shape) for t in (acc, vel))
    _adagrad_2d(x.reshape(shape), np.ascontiguousarray(_np(g)).reshape(shape), a, v, dt(lr), dt(mu), dt(eps))


def warm_up(dtype) -> None:
    """Compile (first run on a machine) or load from numba's cache the kernels for tables of this
    numpy dtype, so that it happens before training starts, not inside the first timed epoch."""
    z = np.zeros((2, 2), dtype)
    i = np.zeros(1, np.int64)
    seen, order = np.zeros(2, np.bool_), np.empty(2, np.int64)
    s = dtype.type(0)
    _adagrad_rows(z, z.copy(), z.copy(), z.copy(), seen, order, i, z[:1], i[:0], z[:0], s, s, s)
    _adagrad_2d(z, z.copy(), z.copy(), z.copy(), s, s, s)
