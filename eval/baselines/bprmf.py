"""BPR-MF with sessions as users (spec §9.4, the 2016 paper's protocol for new sessions).

Training: SGD on the BPR criterion ln σ(u_s·(q_i − q_j)) over the training events in a fresh random
order each epoch; the positive is the event's (session, item), the negative the item of a
uniformly drawn training event (so negatives follow popularity; the official code draws the row
from only the first N rows, a quirk not copied). No regularisation, uniform init ±0.05.
Item biases of the official code are never updated, so they are left out.

Updates are applied for a mini-batch of events at once, each event's gradient taken at the
parameters before the batch and summed (index_add), which is plain sequential SGD for
`batch_size=1`. Prediction: the session vector is the mean of the item factors of the session's
events so far (current included); score = q_j · mean.
"""

from __future__ import annotations

import numpy as np

from gru4rec.eval.baselines.base import Baseline, Batch, TrainData


class BPRMF(Baseline):
    name = "BPR-MF"

    def __init__(
        self, factors: int = 100, epochs: int = 10, lr: float = 0.01, init: float = 0.05,
        batch_size: int = 32, seed: int = 42, score_dtype: str = "float32",
    ):  # fmt: skip
        self.factors, self.epochs, self.lr, self.init = factors, epochs, lr, init
        self.batch_size, self.seed, self.score_dtype = batch_size, seed, score_dtype

    def fit(self, train: TrainData) -> BPRMF:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny ops: extra threads only add synchronisation
        try:
            self._fit(train, torch)
        finally:
            torch.set_num_threads(threads)
        return self

    def _fit(self, train: TrainData, torch) -> None:
        rng = np.random.default_rng(self.seed)
        n_events = len(train.sessions.items)
        user = rng.uniform(-self.init, self.init, (train.n_sessions, self.factors))
        item = rng.uniform(-self.init, self.init, (train.n_items, self.factors))
        u, q = torch.from_numpy(user), torch.from_numpy(item)
        ev_session = torch.from_numpy(train.event_session())
        ev_item = torch.from_numpy(train.sessions.items)
        for _ in range(self.epochs):
            order = torch.from_numpy(rng.permutation(n_events))
            negatives = ev_item[torch.from_numpy(rng.integers(0, n_events, n_events))]
            for lo in range(0, n_events, self.batch_size):
                rows = order[lo : lo + self.batch_size]
                s, i, j = ev_session[rows], ev_item[rows], negatives[lo : lo + self.batch_size]
                us, qi, qj = u[s], q[i], q[j]
                # d/dx ln σ(x) = 1 − σ(x), x = u·(q_i − q_j); ascend.
                g = (self.lr * (1.0 - torch.sigmoid((us * (qi - qj)).sum(1)))).unsqueeze(1)
                u.index_add_(0, s, g * (qi - qj))
                q.index_add_(0, i, g * us)
                q.index_add_(0, j, -g * us)
        self.user_, self.item_ = u.numpy(), q.numpy()
        self._items_t = {}

    def score(self, batch: Batch):
        import torch

        # Dense [B, N]: float32 halves the cost of the matmul and of the ranking; dot products of
        # real-valued factors practically never tie, so float64 (the tests) ranks the same.
        items = self._items_t.get(self.score_dtype)
        if items is None:
            items = self._items_t[self.score_dtype] = torch.from_numpy(self.item_.astype(self.score_dtype))
        sums = batch.prefix_counts(len(self.item_)) @ self.item_
        means = torch.from_numpy((sums / batch.lengths[:, None]).astype(self.score_dtype))
        return means @ items.T
