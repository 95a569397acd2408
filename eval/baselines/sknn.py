"""SKNN and V-SKNN: session-based nearest neighbours (Ludewig & Jannach, 2018).

For the current session (its events so far) the candidate neighbours are the training sessions
sharing at least one item with it; of those the `sample_size` most recent (by last event time;
or a random sample) are kept, the `k` most similar of them (ties: more recent first) form the
neighbourhood, and item j scores Σ_{n in neighbourhood, j in n} sim(s, n).

Sessions are item sets. sim(s, n) = Σ_{i in s ∩ n} w_i / norm, with w_i = 1 for SKNN and, for
V-SKNN, a weight that decays with how far back in the session item i was last seen (position p of
L, 1-based): linear max(0, 1 − 0.1(L − p)), div p/L, quadratic (p/L)², same 1.
norm: cosine sqrt(|s||n|), jaccard |s ∪ n|, dot 1, vec |s| (V-SKNN's "vector" similarity).

Vectorised per batch: overlaps are one sparse product [B, N] x [N, S]; sampling and top-k are
lexsorts over the non-zeros; scores are one sparse product [B, S] x [S, N].
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gru4rec.errors import UserError
from gru4rec.eval.baselines.base import Baseline, Batch, TrainData, top_per_row

WEIGHTINGS = {
    "same": lambda p, n: np.ones_like(p, dtype=np.float64),
    "linear": lambda p, n: np.maximum(0.0, 1.0 - 0.1 * (n - p)),
    "div": lambda p, n: p / n,
    "quadratic": lambda p, n: (p / n) ** 2,
}
SIMILARITIES = ("cosine", "jaccard", "dot", "vec")
SAMPLINGS = ("recent", "random")


class SessionKNN(Baseline):
    name = "SKNN"

    def __init__(
        self, k: int = 100, sample_size: int = 500, similarity: str = "cosine", weighting: str = "same",
        sampling: str = "recent", seed: int = 42,
    ):  # fmt: skip
        if similarity not in SIMILARITIES:
            raise UserError(f"unknown SKNN similarity {similarity!r}; use one of {', '.join(SIMILARITIES)}")
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown V-SKNN weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        if sampling not in SAMPLINGS:
            raise UserError(f"unknown SKNN sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
        if k < 1 or sample_size < 0:
            raise UserError("SKNN needs k >= 1 and sample_size >= 0 (0 = all candidates)")
        self.k, self.sample_size, self.similarity = k, sample_size, similarity
        self.weighting, self.sampling = weighting, sampling
        self.rng = np.random.default_rng(seed)

    def fit(self, train: TrainData) -> SessionKNN:
        self.items_of_ = (train.counts() > 0).astype(np.float64).tocsr()  # [S, N] binary
        self.sessions_of_ = self.items_of_.T.tocsr()  # [N, S]
        self.size_ = np.asarray(self.items_of_.sum(1)).ravel()  # distinct items per session
        # Recency rank: last event time, ties by session order (later first-event = more recent).
        self.recency_ = (
            np.lexsort((np.arange(train.n_sessions), train.last_time)).argsort().astype(np.float64)
        )
        self.n_items_ = train.n_items
        return self

    def _query(self, batch: Batch) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Binary item set and position weights of each row's session so far ([B, N] each)."""
        weight = WEIGHTINGS[self.weighting](batch.prefix_pos, batch.lengths[batch.prefix_row])
        # A repeated item keeps the weight of its latest occurrence: write positions in order, last wins.
        flat = batch.prefix_row * self.n_items_ + batch.prefix_item
        uniq, last = np.unique(flat[::-1], return_index=True)
        last = len(flat) - 1 - last
        rows, cols = uniq // self.n_items_, uniq % self.n_items_
        shape = (batch.size, self.n_items_)
        binary = sp.csr_matrix((np.ones(len(uniq)), (rows, cols)), shape=shape)
        weighted = sp.csr_matrix((weight[last], (rows, cols)), shape=shape)
        return binary, weighted

    def score(self, batch: Batch) -> sp.csr_matrix:
        binary, weighted = self._query(batch)
        overlap = (binary @ self.sessions_of_).tocoo()  # [B, S]: |s ∩ n| for every candidate
        r, n, common = overlap.row, overlap.col, overlap.data
        if self.sample_size:
            key = self.recency_[n] if self.sampling == "recent" else self.rng.random(len(n))
            keep = top_per_row(r, key, self.sample_size)
            r, n, common = r[keep], n[keep], common[keep]
        num = common if self.weighting == "same" else np.asarray((weighted @ self.sessions_of_)[r, n]).ravel()
        q_size = np.asarray(binary.sum(1)).ravel()[r]
        norm = {
            "cosine": lambda: np.sqrt(q_size * self.size_[n]),
            "jaccard": lambda: q_size + self.size_[n] - common,
            "dot": lambda: np.ones(len(n)),
            "vec": lambda: q_size,
        }[self.similarity]()
        sim = num / norm
        keep = top_per_row(r, sim, self.k, tiebreak=self.recency_[n])
        neighbours = sp.csr_matrix((sim[keep], (r[keep], n[keep])), shape=(batch.size, len(self.size_)))
        return (neighbours @ self.items_of_).tocsr()


def vsknn(
    k: int = 100, sample_size: int = 500, weighting: str = "linear", similarity: str = "vec", **kw
) -> SessionKNN:
    """V-SKNN: SKNN with recent items of the current session weighted more."""
    model = SessionKNN(k=k, sample_size=sample_size, similarity=similarity, weighting=weighting, **kw)
    model.name = "V-SKNN"
    return model
