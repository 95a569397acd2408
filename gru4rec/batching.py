"""Session-parallel mini-batches (spec §3), precomputed for a whole epoch.

B slots each hold one session; every step each active slot emits (input, target) = (current item,
next item) and advances. A slot whose session is finished takes the next unused session (sessions
ordered by first-event time, ties by order of appearance in the frame; finished slots served in slot order) and its
hidden state is zeroed. When no session is left, finished slots drop out and the batch shrinks,
keeping slot order, until every pair has been used exactly once.

The whole epoch is computed up front as flat arrays, so the training loop does no per-step host
work and the schedule can live on the device.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import polars as pl

from gru4rec.data import SESSION, TIME
from gru4rec.items import INDEX


@dataclass(frozen=True)
class Sessions:
    """Item indices of all sessions, concatenated in session order (CSR layout)."""

    items: np.ndarray  # int64 [E]
    offsets: np.ndarray  # int64 [S + 1]
    session_ids: np.ndarray  # [S] the user's ids: int64, or object holding str

    @property
    def n_sessions(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_pairs(self) -> int:
        return int(len(self.items) - self.n_sessions)

    @classmethod
    def from_events(cls, events: pl.DataFrame) -> Sessions:
        """Order sessions by first-event time, ties by first appearance in `events` (never by id value,
        so integer and string ids give one order). `events` needs session_id, time, item_idx."""
        order = (
            events.with_row_index("_first")
            .group_by(SESSION)
            .agg(pl.col(TIME).min().alias("_start"), pl.col("_first").min())
            .sort(["_start", "_first"])
            .with_row_index("_rank")
        )
        ev = (
            events.select(SESSION, TIME, INDEX)
            .with_row_index("_row")
            .join(order.select(SESSION, "_rank"), on=SESSION)
            .sort(["_rank", TIME, "_row"])  # stable within a session: file order breaks time ties
        )
        counts = ev.group_by("_rank", maintain_order=True).len()["len"].to_numpy()
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(
            items=ev[INDEX].to_numpy().astype(np.int64),
            offsets=offsets,
            session_ids=_ids_array(order[SESSION]),
        )


@dataclass(frozen=True)
class Schedule:
    """All (input, target) pairs of an epoch in step order; rows of a step are in slot order.

    Step t covers rows step_offsets[t]:step_offsets[t+1]. `slot` says which state row each pair uses,
    `reset` marks the first pair of a session (state zeroed before it), `session` its index in the
    Sessions order and `position` the 0-based position of its input event within the session.
    """

    inputs: np.ndarray
    targets: np.ndarray
    slot: np.ndarray
    reset: np.ndarray
    session: np.ndarray
    position: np.ndarray
    step_offsets: np.ndarray
    n_slots: int

    @property
    def n_steps(self) -> int:
        return len(self.step_offsets) - 1

    def step_sizes(self) -> np.ndarray:
        return np.diff(self.step_offsets)

    def n_full_steps(self) -> int:
        """Leading steps in which all slots are active (the static-shape part of the epoch)."""
        sizes = self.step_sizes()
        short = np.flatnonzero(sizes < self.n_slots)
        return int(short[0]) if len(short) else len(sizes)


def make_schedule(sessions: Sessions, batch_size: int) -> Schedule:
    lengths = np.diff(sessions.offsets)
    usable = np.flatnonzero(lengths >= 2)  # one-event sessions give no pair and are skipped
    n_slots = int(min(batch_size, len(usable)))
    if n_slots == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Schedule(empty, empty, empty, empty.astype(bool), empty, empty, np.zeros(1, np.int64), 0)

    # Greedy assignment: the next session goes to the slot that frees up first, ties by slot index.
    start_step = np.empty(len(usable), dtype=np.int64)
    slot_of = np.empty(len(usable), dtype=np.int64)
    free = [(0, k) for k in range(n_slots)]
    for j, s in enumerate(usable):
        t, k = heapq.heappop(free)
        start_step[j], slot_of[j] = t, k
        heapq.heappush(free, (t + int(lengths[s]) - 1, k))

    n_pairs = lengths[usable] - 1
    pair_session = np.repeat(usable, n_pairs)
    first_pair = np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    position = np.arange(int(n_pairs.sum()), dtype=np.int64) - first_pair
    step = np.repeat(start_step, n_pairs) + position
    slot = np.repeat(slot_of, n_pairs)
    order = np.lexsort((slot, step))
    step, slot, pair_session, position = step[order], slot[order], pair_session[order], position[order]

    src = sessions.offsets[pair_session] + position
    step_offsets = np.searchsorted(step, np.arange(step[-1] + 2), side="left").astype(np.int64)
    return Schedule(
        inputs=sessions.items[src],
        targets=sessions.items[src + 1],
        slot=slot,
        reset=position == 0,
        session=pair_session,
        position=position,
        step_offsets=step_offsets,
        n_slots=n_slots,
    )


def _ids_array(s: pl.Series) -> np.ndarray:
    return np.array(s.to_list(), dtype=object) if s.dtype == pl.String else s.to_numpy().astype(np.int64)
