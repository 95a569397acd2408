"""S-POP: items already seen in the session first (by count), then the POP list (spec §9.4)."""

from __future__ import annotations

import scipy.sparse as sp

from gru4rec.eval.baselines.base import Baseline, Batch, TrainData
from gru4rec.eval.baselines.pop import popularity_scores, same_row


class SessionPop(Baseline):
    name = "S-POP"

    def __init__(self, top_n: int = 100):
        self.top_n = top_n

    def fit(self, train: TrainData) -> SessionPop:
        self.pop_ = popularity_scores(train.support, self.top_n)
        return self

    def score(self, batch: Batch) -> sp.csr_matrix:
        # A count is >= 1 and a POP score < 1, so seen items always come first, most repeated first.
        return (batch.prefix_counts(len(self.pop_)) + same_row(self.pop_, batch.size)).tocsr()
