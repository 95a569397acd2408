"""Extra negative samples drawn in proportion to supp^alpha from a pre-drawn device store (spec §4).

The store holds K = store_size // S rows of S item indices; one row serves one training step and
the whole store is redrawn when exhausted (it persists across epochs). Drawing: float32 CDF of
supp^alpha with its last entry forced to 1, u ~ U[0, 1), sample = #{CDF entries <= u}.
The store tensor keeps its address across redraws, so a CUDA graph can read it.
For resume the generator state from just before the current store was drawn is kept: redrawing
from it rebuilds the identical store.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SampleStore:
    def __init__(self, supp: Tensor, n_sample: int, alpha: float, store_size: int, device, seed: int):
        self.n_sample = int(n_sample)
        self.device = torch.device(device)
        self.n_rows = max(1, int(store_size) // max(1, self.n_sample))
        weights = supp.to(torch.float64).pow(alpha)
        cdf = torch.cumsum(weights, 0) / weights.sum()
        cdf[-1] = 1.0
        self.cdf = cdf.to(torch.float32).to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))
        self.store = torch.zeros(self.n_rows, self.n_sample, dtype=torch.int64, device=self.device)
        self.pos = 0  # next row to serve (host copy; the trainer mirrors it on the device for graphs)
        self._draw_state = self.gen.get_state()
        if self.n_sample > 0:
            self.redraw()

    def redraw(self) -> None:
        self._draw_state = self.gen.get_state()
        u = torch.rand(self.n_rows, self.n_sample, generator=self.gen, device=self.device)
        torch.searchsorted(self.cdf, u, right=True, out=self.store)
        self.store.clamp_(max=len(self.cdf) - 1)  # u is < 1 = cdf[-1], so this never binds; a guard
        self.pos = 0

    def next_row(self) -> Tensor:
        """The next row of S samples (eager path)."""
        if self.pos >= self.n_rows:
            self.redraw()
        row = self.store[self.pos]
        self.pos += 1
        return row

    def state_dict(self) -> dict:
        return {"draw_state": self._draw_state.cpu(), "pos": self.pos, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_rows"] != self.n_rows:
            raise ValueError("sample store size differs from the checkpoint")
        self.gen.set_state(state["draw_state"].cpu())
        if self.n_sample > 0:
            self.redraw()
        self.pos = int(state["pos"])
