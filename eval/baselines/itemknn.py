"""Item-KNN: neighbours of the last item by session co-occurrence (spec §9.4, the 2016 paper).

c(i, j) counts, over training sessions, every pair of events (one of i, one of j, i != j), so an
item repeated in a session counts once per occurrence: C = X^T X with X the [S, N] event counts
and the diagonal zeroed. sim(i, j) = c(i, j) / ((supp_i + λ)^α (supp_j + λ)^(1-α)); each item
keeps its `top_n` most similar items; a prediction scores sim(current item, j).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gru4rec.eval.baselines.base import Baseline, Batch, TrainData, top_per_row


class ItemKNN(Baseline):
    name = "Item-KNN"

    def __init__(self, top_n: int = 100, lam: float = 20.0, alpha: float = 0.5):
        self.top_n, self.lam, self.alpha = top_n, lam, alpha

    def fit(self, train: TrainData) -> ItemKNN:
        x = train.counts()
        c = (x.T @ x).tocoo()
        off_diag = c.row != c.col
        i, j, cij = c.row[off_diag], c.col[off_diag], c.data[off_diag]
        s = train.support + self.lam
        sim = cij / (s[i] ** self.alpha * s[j] ** (1.0 - self.alpha))
        keep = top_per_row(i, sim, self.top_n, tiebreak=-j.astype(np.float64))  # ties: lower index first
        n = train.n_items
        self.sim_ = sp.csr_matrix((sim[keep], (i[keep], j[keep])), shape=(n, n))
        return self

    def score(self, batch: Batch) -> sp.csr_matrix:
        return self.sim_[batch.inputs]
