"""Session-parallel replay of test sessions through any step backend (spec §7).

A backend runs one step of the model for a batch of rows and owns the hidden state, so a GPU
backend keeps it on the device between steps:

    backend.step(item_idx [b], target_idx [b], src_rows [b], reset_mask [b], fetch_topk)
        -> StepOutput(n_greater [b], n_equal [b], topk_idx [b, K], topk_scores [b, K])

Before the step the backend rebuilds its state as `state_prev[:, src_rows] * ~reset_mask`: row r
continues the session that row src_rows[r] of the previous step held, and reset rows (a session's
first event, or padding) start from zero.

Batch shapes. Every session is replayed from a zero state, so the order of sessions cannot change
any rank; the replay serves sessions longest first, which packs the slots so that they run out
together. Slot assignment is the shared `make_schedule` (spec §3), whose batch shrinks once no
session is left. Here the batch size of a step is rounded up to a bucket (B, B/2, B/4, ...) and
the rest of the rows are padding, so a run sees only a handful of fixed shapes (what ORT CUDA
graphs need) while the tail, which is at least as long as the longest session, stops paying for
the full batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from gru4rec.batching import Schedule, Sessions, make_schedule


@dataclass
class StepOutput:
    n_greater: np.ndarray  # int64 [b]: #items scored above the target
    n_equal: np.ndarray  # int64 [b]: #items scored equal to the target, the target included
    topk_idx: np.ndarray | None = None  # int64 [b, K] item indices, best first
    topk_scores: np.ndarray | None = None  # float32 [b, K]


class StepBackend(Protocol):
    name: str  # e.g. "ort-cuda", "torch-cpu"
    device: str  # human-readable device name
    n_items: int
    top_k: int

    def start(self, batch_size: int) -> None:
        """Prepare for batches of up to `batch_size` rows; the state starts at zero."""

    # One step: step(item_idx, target_idx, src_rows, reset_mask, fetch_topk) as the module docstring
    # says; returns host arrays (so the call ends device-synchronised).
    step: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool], StepOutput]


def buckets(batch_size: int) -> np.ndarray:
    """Allowed step batch sizes: batch_size, then halvings down to 1 (ascending)."""
    sizes = {batch_size}
    b = batch_size
    while b > 1:
        b = (b + 1) // 2
        sizes.add(b)
    return np.array(sorted(sizes), dtype=np.int64)


@dataclass(frozen=True)
class Plan:
    """One chunk's replay as [T, B] step arrays; step t uses the first `width[t]` columns.

    The first `n_active[t]` rows of step t are the schedule's pairs of that step in its order
    (slot order); the rows after them, up to the bucket width, are padding.
    """

    sessions: Sessions
    schedule: Schedule
    inputs: np.ndarray  # int64 [T, B]
    targets: np.ndarray  # int64 [T, B]
    src_rows: np.ndarray  # int64 [T, B]: previous-step row each row continues (0 where reset)
    reset: np.ndarray  # bool [T, B]: the row starts from a zero state
    width: np.ndarray  # int64 [T]: batch size of the step (a bucket)
    n_active: np.ndarray  # int64 [T]

    @property
    def n_pairs(self) -> int:
        return len(self.schedule.inputs)


@dataclass
class ChunkResult:
    plan: Plan
    n_greater: np.ndarray  # int64 [P], in schedule order
    n_equal: np.ndarray
    topk_idx: np.ndarray | None  # int64 [P, K]
    topk_scores: np.ndarray | None
    step_seconds: np.ndarray  # float64 [T]: wall time of each backend step


def longest_first(sessions: Sessions) -> Sessions:
    """The same sessions reordered by length, longest first (ties keep their order)."""
    lengths = np.diff(sessions.offsets)
    order = np.argsort(-lengths, kind="stable")
    lens = lengths[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    src = np.repeat(sessions.offsets[order] - offsets[:-1], lens) + np.arange(offsets[-1])
    return Sessions(items=sessions.items[src], offsets=offsets, session_ids=sessions.session_ids[order])


def plan_chunk(events: pl.DataFrame, batch_size: int) -> Plan | None:
    """Replay plan of translated events (session_id, time, item_idx); None if nothing to score."""
    sessions = longest_first(Sessions.from_events(events))
    sched = make_schedule(sessions, batch_size)
    n_pairs = len(sched.inputs)
    if n_pairs == 0:
        return None
    n_active = sched.step_sizes()
    allowed = buckets(batch_size)
    width = allowed[np.searchsorted(allowed, n_active)]
    step = np.repeat(np.arange(len(n_active)), n_active)
    row = np.arange(n_pairs) - sched.step_offsets[step]
    # The previous pair of the same session sits one step earlier; its row there is what to gather.
    by_session = np.lexsort((sched.position, sched.session))
    prev = np.zeros(n_pairs, dtype=np.int64)
    prev[by_session[1:]] = by_session[:-1]
    cont = sched.position > 0
    src = np.where(cont, prev - sched.step_offsets[np.maximum(step - 1, 0)], 0)

    shape = (len(n_active), batch_size)
    inputs, targets, src_rows = (np.zeros(shape, dtype=np.int64) for _ in range(3))
    reset = np.ones(shape, dtype=bool)
    inputs[step, row], targets[step, row], src_rows[step, row] = sched.inputs, sched.targets, src
    reset[step, row] = ~cont
    return Plan(sessions, sched, inputs, targets, src_rows, reset, width, n_active)


def replay(
    backend: StepBackend, plan: Plan, fetch_topk: bool, on_step: Callable[[int], None] | None = None
) -> ChunkResult:
    """Run every step of `plan` through `backend` (already started with the plan's batch size)."""
    n_steps = len(plan.width)
    greater, equal = np.empty(plan.n_pairs, dtype=np.int64), np.empty(plan.n_pairs, dtype=np.int64)
    topk_idx: list[np.ndarray] = []
    topk_scores: list[np.ndarray] = []
    seconds = np.empty(n_steps, dtype=np.float64)
    offsets = plan.schedule.step_offsets
    for t in range(n_steps):
        b, n = plan.width[t], plan.n_active[t]
        t0 = time.perf_counter()
        out = backend.step(
            plan.inputs[t, :b], plan.targets[t, :b], plan.src_rows[t, :b], plan.reset[t, :b], fetch_topk
        )
        seconds[t] = time.perf_counter() - t0
        greater[offsets[t] : offsets[t + 1]] = out.n_greater[:n]
        equal[offsets[t] : offsets[t + 1]] = out.n_equal[:n]
        if fetch_topk:  # copies: a backend may hand out views of buffers that the next step reuses
            topk_idx.append(np.array(out.topk_idx[:n]))
            topk_scores.append(np.array(out.topk_scores[:n]))
        if on_step is not None:
            on_step(int(n))
    return ChunkResult(
        plan=plan,
        n_greater=greater,
        n_equal=equal,
        topk_idx=np.concatenate(topk_idx) if fetch_topk else None,
        topk_scores=np.concatenate(topk_scores) if fetch_topk else None,
        step_seconds=seconds,
    )
