"""Optimisers with dense parameters and row-sparse item tables (spec §6), static shapes throughout.

`IndexedAdagradM` (official): a <- a + g^2; d = -lr g / sqrt(a + eps); with momentum mu > 0:
v <- mu v + d, theta <- theta + v, else theta <- theta + d. Accumulator and velocity start at 0.
Item tables get the same update on the TOUCHED ROWS ONLY (their a and v rows included); untouched
rows keep their velocity frozen. Gradient rows of duplicate indices are summed first.

Row updates avoid torch.unique and sparse tensors so one step has fixed shapes (CUDA-graph safe):
the duplicate-summed gradient of every listed row is built in a scratch table (zero the touched
rows, index_add_ the gradient rows, gather them back). Every occurrence of an index then carries
the same coalesced gradient, computes the same new row and index_copy_ writes identical values.

`step_parts` is the CPU step's entry: each table's rows come as parts [(idx, grad rows), ...]
(shared mode: the output columns and the inputs), duplicates allowed. Adagrad sums and applies them
in one numba loop per table (train/cpu_kernels.py); other optimisers concatenate the parts and
take `step`. Same update.

`RowAdam` (option): Adam on dense parameters, lazy Adam on touched rows (moments of untouched
rows do not decay), bias correction from a device step counter.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _RowOptimizer:
    def __init__(self, dense: list[Tensor], tables: list[Tensor]):
        self.dense, self.tables = list(dense), list(tables)
        self._scratch = [torch.zeros_like(t) for t in self.tables]

    def coalesce(self, k: int, idx: Tensor, grad_rows: Tensor) -> Tensor:
        """Gradient of each listed row with duplicates summed (same row count as idx)."""
        s = self._scratch[k]
        s.index_fill_(0, idx, 0.0)
        s.index_add_(0, idx, grad_rows)
        return s.index_select(0, idx)

    @torch.no_grad()
    def step(self, dense_grads: list[Tensor], rows: list[tuple[Tensor, Tensor]]) -> None:
        """rows[k] = (idx, gradient rows) for table k."""
        self._dense_step(dense_grads)
        for k, (idx, g) in enumerate(rows):
            self._row_step(k, idx, self.coalesce(k, idx, g))

    @torch.no_grad()
    def step_parts(self, dense_grads: list[Tensor], rows: list[list[tuple[Tensor, Tensor]]]) -> None:
        """Like `step`, with rows[k] = [(idx, gradient rows), ...] parts of table k's update."""
        self.step(dense_grads, [(torch.cat([i for i, _ in p]), torch.cat([g for _, g in p])) for p in rows])

    def state_dict(self) -> dict:
        return {
            k: [t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu()
            for k, v in self._state().items()
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in self._state().items():
                if isinstance(v, list):
                    for dst, src in zip(v, state[k]):
                        dst.copy_(src)
                else:
                    v.copy_(state[k])


class IndexedAdagradM(_RowOptimizer):
    def __init__(self, dense, tables, lr: float = 0.05, momentum: float = 0.0, eps: float = 1e-6):
        super().__init__(dense, tables)
        self.lr, self.momentum, self.eps = float(lr), float(momentum), float(eps)
        self.acc = [torch.zeros_like(p) for p in self.dense]
        self.tacc = [torch.zeros_like(t) for t in self.tables]
        self.vel = [torch.zeros_like(p) for p in self.dense] if self.momentum > 0 else []
        self.tvel = [torch.zeros_like(t) for t in self.tables] if self.momentum > 0 else []
        self._loops = None  # step_parts' numba loops over views of this state (CPU only)

    def _state(self) -> dict:
        return {"acc": self.acc, "tacc": self.tacc, "vel": self.vel, "tvel": self.tvel}

    def _dense_step(self, grads: list[Tensor]) -> None:
        if not self.dense:
            return
        torch._foreach_addcmul_(self.acc, grads, grads)
        denom = torch._foreach_add(self.acc, self.eps)
        torch._foreach_sqrt_(denom)
        d = torch._foreach_div(grads, denom)
        torch._foreach_mul_(d, -self.lr)
        if self.momentum > 0:
            torch._foreach_mul_(self.vel, self.momentum)
            torch._foreach_add_(self.vel, d)
            torch._foreach_add_(self.dense, self.vel)
        else:
            torch._foreach_add_(self.dense, d)

    def _row_step(self, k: int, idx: Tensor, g: Tensor) -> None:
        table, acc = self.tables[k], self.tacc[k]
        a = acc.index_select(0, idx).addcmul_(g, g)
        acc.index_copy_(0, idx, a)
        d = g.div_(a.add_(self.eps).sqrt_()).mul_(-self.lr)
        if self.momentum > 0:
            vel = self.tvel[k]
            d = vel.index_select(0, idx).mul_(self.momentum).add_(d)
            vel.index_copy_(0, idx, d)
        table.index_copy_(0, idx, table.index_select(0, idx).add_(d))

    @torch.no_grad()
    def step_parts(self, dense_grads: list[Tensor], rows: list[list[tuple[Tensor, Tensor]]]) -> None:
        if self._loops is None:
            from gru4rec.train.cpu_kernels import AdagradLoops

            self._loops = AdagradLoops(self)
        self._loops.step(dense_grads, rows)


class RowAdam(_RowOptimizer):
    def __init__(self, dense, tables, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(dense, tables)
        self.lr, (self.b1, self.b2), self.eps = float(lr), betas, float(eps)
        dev = (self.dense or self.tables)[0].device
        self.t = torch.zeros((), device=dev)  # step count on the device: no host sync, graph safe
        self.m = [torch.zeros_like(p) for p in self.dense]
        self.v = [torch.zeros_like(p) for p in self.dense]
        self.tm = [torch.zeros_like(t) for t in self.tables]
        self.tv = [torch.zeros_like(t) for t in self.tables]

    def _state(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v, "tm": self.tm, "tv": self.tv}

    def step(self, dense_grads, rows) -> None:
        self.t.add_(1.0)
        super().step(dense_grads, rows)

    def _scale(self) -> tuple[Tensor, Tensor]:
        """(-lr / (1 - b1^t), 1 / sqrt(1 - b2^t)) as device scalars."""
        step_size = -self.lr / (1.0 - torch.pow(self.b1, self.t))
        return step_size, torch.rsqrt(1.0 - torch.pow(self.b2, self.t))

    def _dense_step(self, grads: list[Tensor]) -> None:
        if not self.dense:
            return
        step_size, inv_bc2 = self._scale()
        torch._foreach_lerp_(self.m, grads, 1.0 - self.b1)
        torch._foreach_mul_(self.v, self.b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - self.b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_mul_(denom, inv_bc2)
        torch._foreach_add_(denom, self.eps)
        upd = torch._foreach_div(self.m, denom)
        torch._foreach_mul_(upd, step_size)
        torch._foreach_add_(self.dense, upd)

    def _row_step(self, k: int, idx: Tensor, g: Tensor) -> None:
        step_size, inv_bc2 = self._scale()
        m = self.tm[k].index_select(0, idx).lerp_(g, 1.0 - self.b1)
        v = self.tv[k].index_select(0, idx).mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
        self.tm[k].index_copy_(0, idx, m)
        self.tv[k].index_copy_(0, idx, v)
        upd = m / (v.sqrt() * inv_bc2 + self.eps) * step_size
        table = self.tables[k]
        table.index_copy_(0, idx, table.index_select(0, idx).add_(upd))


def make_optimizer(name: str, dense, tables, lr: float, momentum: float):
    if name == "adagrad":
        return IndexedAdagradM(dense, tables, lr=lr, momentum=momentum)
    if name == "adam":
        return RowAdam(dense, tables, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")
