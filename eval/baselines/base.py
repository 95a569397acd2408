"""What every baseline shares: the training/test layout, the batch replay and the metric code.

A baseline is fitted on the training sessions and then asked, for a batch of test events at once,
for a score over all N items ([B, N]); ranks come from `gru4rec.metrics.target_ranks` and go into a
`RankAccumulator`, exactly as for GRU4Rec. Each prediction sees only its own session's events up
to and including the current one (its "prefix"), handed over as flat COO arrays so a baseline can
build whatever it needs (counts, sets, position weights) with array operations, never a Python
loop per event.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from gru4rec.batching import Sessions
from gru4rec.data import SESSION, TIME
from gru4rec.errors import UserError
from gru4rec.items import ItemMap, drop_short_sessions
from gru4rec.metrics import RankAccumulator, ranks_from_counts, target_ranks

# Scores are float64 so that sums of similarities do not collide into ties that float32 would make;
# a batch is sized to keep the [B, N] matrix near this many elements (64 MB).
SCORE_BUDGET = 8_000_000


@dataclass(frozen=True)
class TrainData:
    """Training sessions as CSR over item indices, with the statistics several baselines need."""

    sessions: Sessions  # ordered by first-event time
    n_items: int
    support: np.ndarray  # float64 [N]: training events per item (repeats included)
    last_time: np.ndarray  # float64 [S]: time of each session's last event (recency for SKNN)

    @property
    def n_sessions(self) -> int:
        return self.sessions.n_sessions

    def event_session(self) -> np.ndarray:
        """Session index of every training event, aligned with `sessions.items`."""
        return np.repeat(np.arange(self.n_sessions), np.diff(self.sessions.offsets))

    def counts(self) -> sp.csr_matrix:
        """[S, N] event counts per session and item (duplicates summed)."""
        s = self.sessions
        data = np.ones(len(s.items), dtype=np.float64)
        m = sp.csr_matrix((data, (self.event_session(), s.items)), shape=(self.n_sessions, self.n_items))
        m.sum_duplicates()
        return m


@dataclass(frozen=True)
class Batch:
    """A batch of B predictions: the current (input) item and each prediction's session prefix.

    The prefix of row r is its session's events from the first one up to the current one, as flat
    arrays: `prefix_row` (which row), `prefix_item`, `prefix_pos` (1-based position in the session).
    """

    inputs: np.ndarray  # int64 [B]
    lengths: np.ndarray  # int64 [B]: prefix length (current event included)
    prefix_row: np.ndarray
    prefix_item: np.ndarray
    prefix_pos: np.ndarray

    @property
    def size(self) -> int:
        return len(self.inputs)

    def prefix_counts(self, n_items: int) -> sp.csr_matrix:
        """[B, N] how often each item occurred in the prefix."""
        data = np.ones(len(self.prefix_item), dtype=np.float64)
        m = sp.csr_matrix((data, (self.prefix_row, self.prefix_item)), shape=(self.size, n_items))
        m.sum_duplicates()
        return m


class Baseline(ABC):
    name: str = "baseline"

    @abstractmethod
    def fit(self, train: TrainData) -> Baseline: ...

    @abstractmethod
    def score(self, batch: Batch) -> np.ndarray | sp.csr_matrix:
        """[B, N] (NumPy float64, or a torch tensor): higher = recommended earlier; items a model does
        not rank score 0.

        Sparse models return a CSR matrix (absent entries = 0): ranking then costs O(non-zeros)
        instead of O(B·N), through the same counts -> ranks function the ONNX scorer uses.
        """


@dataclass(frozen=True)
class EvalData:
    """Test sessions (CSR, in the training item map) and one row per prediction."""

    sessions: Sessions
    session: np.ndarray  # [P] index of each prediction's session
    position: np.ndarray  # [P] 0-based position of its input event
    n_unknown_dropped: int

    @property
    def n_predictions(self) -> int:
        return len(self.session)

    def event_index(self, rows: np.ndarray) -> np.ndarray:
        return self.sessions.offsets[self.session[rows]] + self.position[rows]

    def targets(self, rows: np.ndarray) -> np.ndarray:
        return self.sessions.items[self.event_index(rows) + 1]

    def batch(self, rows: np.ndarray) -> Batch:
        start = self.sessions.offsets[self.session[rows]]
        lengths = self.position[rows] + 1
        prefix_row = np.repeat(np.arange(len(rows)), lengths)
        pos0 = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return Batch(
            inputs=self.sessions.items[start + self.position[rows]],
            lengths=lengths,
            prefix_row=prefix_row,
            prefix_item=self.sessions.items[np.repeat(start, lengths) + pos0],
            prefix_pos=pos0 + 1,
        )


def prepare_train(events: pl.DataFrame) -> tuple[TrainData, ItemMap]:
    """Item map (first appearance, as GRU4Rec) and the training layout from canonical events."""
    if events.height == 0:
        raise UserError("training data has no events")
    items = ItemMap.from_events(events)
    ev, _ = items.translate(events)
    sessions = Sessions.from_events(ev)
    last = ev.group_by(SESSION).agg(pl.col(TIME).max().alias("_last"))
    order = pl.DataFrame({SESSION: sessions.session_ids}).join(
        last, on=SESSION, how="left", maintain_order="left"
    )
    support = np.bincount(sessions.items, minlength=len(items)).astype(np.float64)
    return TrainData(sessions, len(items), support, order["_last"].to_numpy().astype(np.float64)), items


def prepare_test(events: pl.DataFrame, items: ItemMap) -> EvalData:
    """Translate with the training item map (unknown items dropped as events, spec §7)."""
    ev, n_dropped = items.translate(events)
    ev = drop_short_sessions(ev)
    if ev.height == 0:
        raise UserError("test data has no session with two or more known items")
    sessions = Sessions.from_events(ev)
    n_pred = np.diff(sessions.offsets) - 1
    session = np.repeat(np.arange(sessions.n_sessions), n_pred)
    position = np.arange(int(n_pred.sum())) - np.repeat(np.cumsum(n_pred) - n_pred, n_pred)
    return EvalData(sessions, session, position, n_dropped)


def evaluate(
    model: Baseline,
    test: EvalData,
    n_items: int,
    cutoffs: Sequence[int] = tuple(range(1, 21)),
    modes: Sequence[str] = ("standard", "conservative"),
    batch_size: int | None = None,
    force_dense: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Replay every test prediction through `model` -> {tie mode: RankAccumulator.result()}.

    `force_dense` ranks sparse scores densely with `target_ranks` too (the tests compare the paths).
    """
    import torch

    accs = {mode: RankAccumulator(tuple(cutoffs)) for mode in modes}
    bs = batch_size or max(16, SCORE_BUDGET // max(n_items, 1))
    for lo in range(0, test.n_predictions, bs):
        rows = np.arange(lo, min(lo + bs, test.n_predictions))
        scores, targets = model.score(test.batch(rows)), test.targets(rows)
        if sp.issparse(scores) and not force_dense:
            n_greater, n_equal = sparse_counts(sp.csr_matrix(scores), targets)
            for mode, acc in accs.items():
                acc.add(ranks_from_counts(n_greater, n_equal, mode))
        else:
            dense_scores = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(_dense(scores))
            for mode, acc in accs.items():
                acc.add(target_ranks(dense_scores, torch.from_numpy(targets), mode))
        if on_batch:
            on_batch(len(rows))
    return {mode: acc.result() for mode, acc in accs.items()}


def sparse_counts(scores: sp.csr_matrix, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """#{s_i > s*} and #{s_i == s*} (target included) per row of a CSR score matrix; absent = 0."""
    n_rows, n_items = scores.shape
    t = np.asarray(scores[np.arange(n_rows), targets]).ravel()
    per_row = np.diff(scores.indptr)
    row = np.repeat(np.arange(n_rows), per_row)
    t_entry = t[row]
    greater = np.bincount(row, weights=scores.data > t_entry, minlength=n_rows)
    equal = np.bincount(row, weights=scores.data == t_entry, minlength=n_rows)
    implicit = n_items - per_row  # entries not stored are zeros
    greater += np.where(t < 0, implicit, 0)
    equal += np.where(t == 0, implicit, 0)
    return greater.astype(np.int64), equal.astype(np.int64)


def top_per_row(rows: np.ndarray, key: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Mask of the entries with the k largest `key` within each row (ties: larger `tiebreak` first,
    then earlier entry). `rows` need not be sorted."""
    if len(rows) == 0:
        return np.zeros(0, dtype=bool)
    second = np.zeros(len(rows)) if tiebreak is None else tiebreak
    order = np.lexsort((np.arange(len(rows)), -second, -key, rows))
    r = rows[order]
    first = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    run_start = np.repeat(first, np.diff(np.r_[first, len(r)]))
    keep = np.zeros(len(rows), dtype=bool)
    keep[order[(np.arange(len(r)) - run_start) < k]] = True
    return keep


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)
