"""POP: the same list for everyone, the most frequent training items (spec §9.4)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gru4rec.eval.baselines.base import Baseline, Batch, TrainData, top_per_row


def popularity_scores(support: np.ndarray, top_n: int) -> np.ndarray:
    """supp/(supp+1) for the `top_n` most supported items (ties: first-seen item first), 0 elsewhere."""
    keep = top_per_row(np.zeros(len(support), dtype=np.int64), support, top_n)
    return np.where(keep, support / (support + 1.0), 0.0)


class Pop(Baseline):
    name = "POP"

    def __init__(self, top_n: int = 100):
        self.top_n = top_n

    def fit(self, train: TrainData) -> Pop:
        self.scores_ = popularity_scores(train.support, self.top_n)
        return self

    def score(self, batch: Batch) -> sp.csr_matrix:
        return same_row(self.scores_, batch.size)


def same_row(scores: np.ndarray, n_rows: int) -> sp.csr_matrix:
    """[n_rows, N] CSR holding the non-zeros of `scores` in every row."""
    cols = np.flatnonzero(scores)
    indptr = np.arange(n_rows + 1, dtype=np.int64) * len(cols)
    return sp.csr_matrix(
        (np.tile(scores[cols], n_rows), np.tile(cols, n_rows), indptr), shape=(n_rows, len(scores))
    )
