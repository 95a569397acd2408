"""Numba loops of the CPU step (train/cpu_step.py): one pass where ATen needs a dozen ops.

On a CPU the item-table update is the step's largest cost after the output GEMMs, and not for its
arithmetic: ATen spends it in a dozen separate ops (index_add_ per table, index_select of the
accumulator and velocity rows, one elementwise pass per operator), each a dispatch and a walk over
the touched rows. `AdagradLoops` sums repeated rows in a compact buffer (a row seen once is read
where it is) and updates each touched row in one loop, and the GRU weights likewise, rows split over torch's threads;
`gru_cell_backward` writes a GRU cell's pre-activation gradients in one pass (bitwise equal to the
ATen ops). Compiled once per machine (numba's on-disk cache), loaded by `warm_up` before training
starts.

Update (official IndexedAdagradM): a <- a + g^2; d = -lr g / sqrt(a + eps); with momentum mu > 0,
v <- mu v + d and theta <- theta + v; else theta <- theta + d. Scalars come in the tables' dtype, so
float32 tables are updated in float32 as ATen does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from gru4rec.jit import fill_mask, use_torch_threads


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
def _slot_rows(slot, order, cnt, first, n, idx, base):
    """Gives each new table row of idx a slot (rows listed in order of first appearance) and counts
    its occurrences; first[s] = base + position of the slot's first occurrence."""
    for i in range(idx.shape[0]):
        r = idx[i]
        s = slot[r]
        if s < 0:
            slot[r] = n
            order[n] = r
            cnt[n] = 1
            first[n] = base + i
            n += 1
        else:
            cnt[s] += 1
    return n


@njit(nogil=True, error_model="numpy", cache=True)
def _sum_repeats(buf, slot, cnt, first, idx, g, base):
    """buf[s] = the sum of g's rows of every row that occurs more than once, in occurrence order."""
    for i in range(idx.shape[0]):
        s = slot[idx[i]]
        if cnt[s] > 1:
            if first[s] == base + i:
                for j in range(buf.shape[1]):
                    buf[s, j] = g[i, j]
            else:
                for j in range(buf.shape[1]):
                    buf[s, j] += g[i, j]


@njit(nogil=True, error_model="numpy", cache=True, parallel=True)
def _adagrad_rows(table, acc, vel, buf, slot, order, cnt, first, idx_a, g_a, idx_b, g_b, lr, mu, eps):
    na = idx_a.shape[0]
    n = _slot_rows(slot, order, cnt, first, 0, idx_a, 0)
    n = _slot_rows(slot, order, cnt, first, n, idx_b, na)
    _sum_repeats(buf, slot, cnt, first, idx_a, g_a, 0)
    _sum_repeats(buf, slot, cnt, first, idx_b, g_b, na)
    for k in prange(n):  # distinct rows: no two threads touch the same row
        r = order[k]
        denom = np.empty(table.shape[1], table.dtype)
        t, a, v = table[r : r + 1], acc[r : r + 1], vel[r : r + 1]
        i = first[k]
        if cnt[k] > 1:  # a row seen once is read where it is: most rows, and no copy through buf
            _update_row(t, a, v, buf[k : k + 1], 0, denom, lr, mu, eps)
        elif i < na:
            _update_row(t, a, v, g_a[i : i + 1], 0, denom, lr, mu, eps)
        else:
            _update_row(t, a, v, g_b[i - na : i - na + 1], 0, denom, lr, mu, eps)
        slot[r] = -1


@njit(nogil=True, error_model="numpy", cache=True, parallel=True)
def _adagrad_2d(p, g, acc, vel, lr, mu, eps):
    for r in prange(p.shape[0]):
        denom = np.empty(p.shape[1], p.dtype)
        _update_row(p, acc, vel, g, r, denom, lr, mu, eps)


@njit(nogil=True, error_model="numpy", cache=True, parallel=True)
def _gru_cell_backward(dy, mask, h, r, z, n, gh_n, dgi, dgh, one):
    H = dy.shape[1]
    masked = mask.shape[0] > 0
    for b in prange(dy.shape[0]):
        # one output row per loop, indexed from 0: LLVM's alias checks stay few and each loop
        # vectorises (a fused loop over several outputs runs scalar; the results are the same bits)
        d, hb, rb, zb, nb, gb = dy[b], h[b], r[b], z[b], n[b], gh_n[b]
        i_r, i_z, i_n = dgi[b, :H], dgi[b, H : 2 * H], dgi[b, 2 * H :]
        h_r, h_z, h_n = dgh[b, :H], dgh[b, H : 2 * H], dgh[b, 2 * H :]
        if masked:
            mb = mask[b]
            for j in range(H):
                i_n[j] = d[j] * mb[j]  # d(output) through the dropout mask, for the next two loops
        else:
            for j in range(H):
                i_n[j] = d[j]
        for j in range(H):
            i_z[j] = i_n[j] * (hb[j] - nb[j]) * zb[j] * (one - zb[j])
        for j in range(H):
            i_n[j] = i_n[j] * (one - zb[j]) * (one - nb[j] * nb[j])
        for j in range(H):
            i_r[j] = i_n[j] * gb[j] * rb[j] * (one - rb[j])
        for j in range(H):
            h_n[j] = i_n[j] * rb[j]
        for j in range(H):
            h_r[j] = i_r[j]
            h_z[j] = i_z[j]


@njit(nogil=True, error_model="numpy", cache=True)
def _columns(tgt, smp, count, by, q_in, q_smp, neg_logq, xe, merge, cols, w, bias):
    R, N = tgt.shape[0], count.shape[0]
    for s in smp:
        count[s] += 1
    for c in range(R):
        cols[c] = tgt[c]
        w[c] = 1
        if merge:  # a target's sampled copies join its first column (cleared: none for a repeat)
            w[c] += count[tgt[c]]
            count[tgt[c]] = 0
    n = R
    if N <= 16 * smp.shape[0]:  # a scan of the count table beats a sort
        for item in range(N):
            if count[item] > 0:
                cols[n] = item
                n += 1
    else:
        for item in np.unique(smp):
            if count[item] > 0:
                cols[n] = item
                n += 1
    for c in range(R, n):
        w[c] = count[cols[c]]
        count[cols[c]] = 0
    for c in range(n):
        if xe:  # the order of the ATen ops this replaces: (q (-logq) + log w) + b
            q = q_in[cols[c]] if c < R else q_smp[cols[c]]
            bias[c] = (q * neg_logq + np.log(w[c])) + by[cols[c], 0]
        else:
            bias[c] = by[cols[c], 0]
    return n


@njit(nogil=True, error_model="numpy", cache=True)
def _bpr_max_block(o, e, g, kt, x, w, bpreg, alpha, scale, floor, one, two, row_loss, lo, hi):
    """Batch rows lo..hi of _bpr_max_cols. Each inner loop runs over the block's contiguous rows of
    one column from index 0 and writes one array: then LLVM vectorises it (a fused loop over a
    [4, width] accumulator ran scalar)."""
    W = hi - lo
    # per row: S, P, B, Q unnormalised, in float64 whatever the arrays' type: the gradient's terms
    # below cancel, and float32 sums over ~1,500 columns cost 2 decimal digits there
    s0, s1, s2, s3 = np.zeros(W), np.zeros(W), np.zeros(W), np.zeros(W)
    has_kt = kt.shape[0] > 0
    ktb = kt[lo:hi] if has_kt else kt
    for j in range(o.shape[0]):
        wj = w[j]
        ej, gj, oj = e[j, lo:hi], g[j, lo:hi], o[j, lo:hi]
        if has_kt:  # g = sigmoid(t - o) = 1 / (1 + e^(o - max) e^(max - t)): no second exp
            for k in range(W):
                gj[k] = one / (one + ej[k] * ktb[k])
        for k in range(W):
            s0[k] += ej[k] * wj
        for k in range(W):
            s1[k] += ej[k] * wj * gj[k]
        for k in range(W):
            s2[k] += ej[k] * wj * oj[k] * oj[k]
        for k in range(W):
            s3[k] += ej[k] * wj * gj[k] * gj[k]
    for k in range(W):  # row i's own column counts w[i] - 1 times: once less (e[i, i] = 0 if w[i] = 1)
        i = lo + k
        s0[k] -= e[i, i]
        s1[k] -= e[i, i] * g[i, i]
        s2[k] -= e[i, i] * o[i, i] * o[i, i]
        s3[k] -= e[i, i] * g[i, i] * g[i, i]
    S = s0
    P, B, Q = s1 / S, s2 / S, s3 / S
    inv = one / (P + floor)
    c = bpreg * B - P * inv
    ws = one / S
    for k in range(W):
        row_loss[lo + k] = -np.log(P[k] + floor) + bpreg * B[k]
    # no branch on the diagonal inside the loop: there it weighs the negative by w[i], rescaled to
    # w[i] - 1 after, plus the positive's own gradient
    for j in range(o.shape[0]):
        wj = w[j]
        ej, gj, oj, xj = e[j, lo:hi], g[j, lo:hi], o[j, lo:hi], x[j, lo:hi]
        for k in range(W):
            d = ej[k] * wj * ws[k] * (bpreg * (oj[k] * oj[k] + two * oj[k]) - inv[k] * gj[k] * gj[k] - c[k])
            if alpha > 0:  # ELU backward from its output: o + alpha below 0
                d *= one if xj[k] > 0 else oj[k] + alpha
            ej[k] = d * scale
    for k in range(W):
        i = lo + k
        d = -(P[k] - Q[k]) * inv[k]
        if alpha > 0 and not x[i, i] > 0:
            d *= o[i, i] + alpha
        e[i, i] = e[i, i] * ((w[i] - one) / w[i]) + d * scale


@njit(nogil=True, error_model="numpy", cache=True, parallel=True)
def _bpr_max_cols(o, e, g, kt, x, w, bpreg, alpha, scale, floor, one, two, row_loss, nt):
    """Arrays [C, R]: column i holds batch row i over the C columns. One block of batch rows per
    thread (nt threads; blocks a multiple of 16 wide); within a block the C columns in order (each
    row's sums in the order of a row loop). g is filled here from e when kt (each row's
    e^(max - target)) is given, else given."""
    R = o.shape[1]
    width = (R + nt - 1) // nt
    width = (width + 15) // 16 * 16
    for blk in prange((R + width - 1) // width):
        lo = blk * width
        _bpr_max_block(
            o, e, g, kt, x, w, bpreg, alpha, scale, floor, one, two, row_loss, lo, min(R, lo + width)
        )


def _np(t, out: bool = False) -> np.ndarray:
    """The tensor's memory as an array (no copy); an array written to must be contiguous."""
    a = (t.detach() if t.requires_grad else t).numpy()
    if out and not a.flags.c_contiguous:
        raise ValueError("Adagrad state must be contiguous")
    return a


def _rows_view(t) -> np.ndarray:
    """A parameter as rows: a matrix as it is, a vector as one row (the loops walk rows)."""
    a = _np(t, out=True)
    return a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(1, -1)


class RowWork:
    """_adagrad_rows' work buffers for one table: the summed gradient rows of repeated rows (`buf`,
    the optimiser's own scratch table, which its other update path also overwrites before use), each
    table row's slot (-1: none), and per slot its row, occurrence count and first occurrence. slot
    is left as found after every call."""

    def __init__(self, scratch):
        self.buf = _np(scratch, out=True)
        self.slot = np.full(len(self.buf), -1, np.int64)
        self.order, self.cnt, self.first = (np.empty(len(self.buf), np.int64) for _ in range(3))


class AdagradLoops:
    """An IndexedAdagradM's update (train/optim.py) through the loops above. The arrays are views
    of the optimiser's and the model's tensors, made once: those are updated in place, never
    replaced."""

    def __init__(self, opt):
        dt = _np((opt.tables or opt.dense)[0]).dtype.type
        self.scalars = dt(opt.lr), dt(opt.momentum), dt(opt.eps)
        vel = opt.vel or opt.dense  # unused without momentum: any array of the right shape
        tvel = opt.tvel or opt.tables
        # a column-major matrix (cpu_step.column_major_) is walked as its transpose, with its state
        # and gradient alike: the update is elementwise (a state of another layout fails here)
        self.flip = [p.dim() == 2 and not p.is_contiguous() for p in opt.dense]
        self.dense = [
            tuple(_rows_view(t.T if f else t) for t in ts)
            for f, *ts in zip(self.flip, opt.dense, opt.acc, vel)
        ]
        self.tables = [
            (*(_np(t, out=True) for t in ts), RowWork(s))
            for *ts, s in zip(opt.tables, opt.tacc, tvel, opt._scratch)
        ]

    def step(self, dense_grads: list, rows: list) -> None:
        """rows[k] = [(idx, gradient rows), ...]: one or two parts of table k's update, duplicates
        summed first (in the parts' order)."""
        use_torch_threads()
        for (t, a, v, w), parts in zip(self.tables, rows):
            ia, ga = parts[0]
            ib, gb = parts[1] if len(parts) > 1 else (ia[:0], ga[:0])
            work = (w.buf, w.slot, w.order, w.cnt, w.first)
            _adagrad_rows(t, a, v, *work, _np(ia), _np(ga), _np(ib), _np(gb), *self.scalars)
        # the GRU weights last: what of them stays in cache serves the next step's first products
        for (p, a, v), g, f in zip(self.dense, dense_grads, self.flip):
            _adagrad_2d(p, np.ascontiguousarray(_np(g.T if f else g)).reshape(p.shape), a, v, *self.scalars)


class Columns:
    """The output layer's columns of a step: the R targets, then each distinct sampled item once
    (ascending; none without samples) with its draw count as weight; and each column's bias,
    By[item], for cross-entropy shifted by -logq log q(item) + log(weight) (q: the target or the
    sampling popularity). One loop instead of a dozen small ATen ops.

    merge (bpr-max): an item that is both a target and drawn as a sample is scored once, in its
    first target column, whose weight becomes 1 + its draw count; row i's own column is then
    also its negative, of weight w[i] - 1 (`bpr_max_grad`). With the diginetica preset on rsc15
    ~75 of ~1,556 columns go (every output GEMM shrinks by that). Cross-entropy keeps the copies:
    its target and sample columns differ in their log q shift."""

    def __init__(self, by, log_q_in, log_q_smp, logq: float, xe: bool, merge: bool = False):
        self.by, self.dtype = _np(by), by.dtype
        self.q_in, self.q_smp = _np(log_q_in.to(by.dtype)), _np(log_q_smp.to(by.dtype))
        self.count = np.zeros(len(self.by), np.int64)
        self.neg_logq, self.xe, self.merge = self.by.dtype.type(-logq), xe, merge and not xe

    def __call__(self, tgt, smp) -> tuple:
        """(cols, weights, biases) for target and sample indices."""
        size = len(tgt) + len(smp)
        cols, w, bias = (
            torch.empty(size, dtype=torch.int64),
            torch.empty(size, dtype=self.dtype),
            torch.empty(size, dtype=self.dtype),
        )
        n = _columns(
            _np(tgt), _np(smp), self.count, self.by, self.q_in, self.q_smp, self.neg_logq, self.xe,
            self.merge, cols.numpy(), w.numpy(), bias.numpy(),
        )  # fmt: skip
        return cols[:n], w[:n], bias[:n]


def _elu(x, alpha: float):
    """ELU as max(x, alpha (e^min(x, 0) - 1)), exact for alpha <= 1 (alpha (e^x - 1) >= x below 0),
    absolute error under 1e-7 against expm1: ATen's CPU elu is much slower than its exp, and this
    is two in-place passes."""
    if alpha > 1.0:
        return torch.nn.functional.elu(x, alpha=alpha)
    o = x.clamp(max=0.0).exp_().sub_(1.0)
    if alpha != 1.0:
        o.mul_(alpha)
    return torch.maximum(o, x, out=o)


def bpr_max_grad(scores_t, w, bpreg: float, alpha: float, scale: float, floor: float) -> tuple:
    """(sum of row losses, scale x d loss / d scores_t) of bpr-max (train/losses.py) on scores laid
    out [C, R] (column i: batch row i; the step's output product is fastest that way), whose first
    R rows are the batch rows' targets (the diagonal: positives), weighted by w (None: 1). With o
    the ELU-activated scores, s the softmax of o over the negatives (weighted; the diagonal with
    weight w[i] - 1, a merged target's sampled copies, see Columns), g = sigmoid(o_target - o),
    P = sum s g, B = sum s o^2, Q = sum s g^2: loss = -log(P + floor) + bpreg B; dL/do = s (bpreg
    (o^2 + 2 o) - g^2 / (P + floor) - c) with c = bpreg B - P / (P + floor), plus -(P - Q) / (P +
    floor) on the diagonal. ATen does the one exponential (vectorised), e = e^(o - max); one loop
    does g = 1 / (1 + e e^(max - t)) and the ~20 passes of sums and products."""
    o = _elu(scores_t, alpha) if alpha > 0 else scores_t
    t = torch.diagonal(o).unsqueeze(0)
    e = o.clone()
    # the max over the negatives, the shift that cannot underflow all: row i's own column is one
    # of them only when its weight (Columns' merge) is over 1
    if w is None:
        w = scores_t.new_ones(scores_t.shape[0])
    own = torch.diagonal(e)
    own.masked_fill_(w[: len(own)] <= 1, -math.inf)
    mx = e.amax(0, keepdim=True)
    e.sub_(mx).exp_()
    kt = mx.sub_(t).squeeze(0)
    if float(kt.max()) < 60.0:  # e^(max - t) finite and e^(o - max) e^(max - t) exact enough
        kt.exp_()
        g = torch.empty_like(o)  # filled by the loop
    else:  # a target far below the best negative (diverging scores): sigmoid itself
        kt = kt[:0]
        g = torch.sub(t, o).sigmoid_()
    loss = scores_t.new_empty(scores_t.shape[1])
    dt = _np(scores_t).dtype.type
    _bpr_max_cols(
        _np(o), _np(e), _np(g), _np(kt), _np(scores_t), _np(w), dt(bpreg), dt(alpha), dt(scale), dt(floor), dt(1), dt(2),
        loss.numpy(), use_torch_threads(),
    )  # fmt: skip
    return loss.sum(), e


def gru_cell_backward(dy, mask, h, r, z, n, gh_n) -> tuple:
    """(dgi, dgh): the gradients of a GRU cell's two pre-activations [i_r, i_z, i_n] and
    [h_r, h_z, h_n] from dy = d(output), times the dropout mask (or None), for
    y = (1 - z) n + z h, n = tanh(i_n + r h_n), r and z sigmoids. One pass instead of ~15 ATen ops."""
    B, H = dy.shape
    dgi, dgh = dy.new_empty(B, 3 * H), dy.new_empty(B, 3 * H)
    d, hh, rr, zz, nn, ghn = (_np(t) for t in (dy, h, r, z, n, gh_n))
    mk = _np(mask) if mask is not None else np.empty((0, 0), d.dtype)
    _gru_cell_backward(d, mk, hh, rr, zz, nn, ghn, _np(dgi), _np(dgh), d.dtype.type(1))
    return dgi, dgh


def warm_up(dtype: torch.dtype) -> None:
    """Compile (first run on a machine) or load from numba's cache every loop for this dtype, with
    the array layouts the step passes, so that it happens before training, not in the first epoch."""
    use_torch_threads()
    z = torch.zeros(2, 2, dtype=dtype)
    for rows in (2, 1):  # r, z, n and gh_n are column slices of wider results; with one row, contiguous
        a, wide = torch.zeros(rows, 2, dtype=dtype), torch.zeros(rows, 6, dtype=dtype)
        for mask in (None, a):
            gru_cell_backward(a, mask, a, wide[:, :2], wide[:, 2:4], wide[:, 4:], wide[:, 4:])
    from gru4rec.train.optim import IndexedAdagradM

    for mu in (0.0, 0.5):
        opt = IndexedAdagradM([z.clone()], [z.clone()], lr=0.0, momentum=mu, eps=1.0)
        opt.step_parts([z], [[(torch.zeros(1, dtype=torch.int64), z[:1])]])
    for alpha in (0.0, 1.0):
        bpr_max_grad(z, None, 1.0, alpha, 1.0, 1e-24)
        bpr_max_grad(z, z[0].clone(), 1.0, alpha, 1.0, 1e-24)
    for xe in (False, True):
        i = torch.zeros(1, dtype=torch.int64)
        Columns(z[:, :1], z[:, 0].float(), z[:, 0].float(), 1.0, xe)(i, i)
        Columns(torch.zeros(40, 1, dtype=dtype), *(torch.zeros(40),) * 2, 1.0, xe)(i, i)  # the sort
    fill_mask(_np(z).reshape(-1), np.uint64(0), np.uint64(1), _np(z).dtype.type(1))
