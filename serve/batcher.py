"""Micro-batching: concurrent events become one ONNX Runtime call, as inference servers' dynamic
batchers do.

The first queued event starts a window of at most `max_wait_ms`; the batch closes when it holds
`max_batch` events, as many as the previous batch, or the window ends. Per batch: one state read for all its sessions (one MGET
on Redis), one `ServedModel.step` in a worker thread (ORT releases the GIL, so the event loop
keeps parsing the next requests meanwhile, and they queue for the next batch), one state write
(one pipeline), then every event's future is resolved. Because the write completes before the
futures do, a response is never sent before its state is stored.

The model is read once per batch (`models.current`): a hot reload swaps it between batches, an
in-flight batch finishes on the model it started with, and its states are written under that
model's export id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gru4rec.serve.model import ServedModel
from gru4rec.serve.state import StateStore, decode, encode, record_key


@dataclass
class Event:
    session_id: int | str
    item_id: int | str  # looked up in the batch's own model: a reload may come between submit and run
    future: asyncio.Future = field(repr=False)


@dataclass
class Outcome:
    model: ServedModel
    topk_idx: np.ndarray  # int [K] (empty: a session with no known item yet)
    topk_scores: np.ndarray  # float32 [K]
    unknown_item: bool


@dataclass
class BatchConfig:
    max_batch: int = 64
    max_wait_ms: float = 1.0


class ModelHolder:
    """The model in use; `current` is replaced whole by a reload (one attribute write)."""

    def __init__(self, model: ServedModel):
        self.current = model


class Batcher:
    def __init__(self, models: ModelHolder, store: StateStore, config: BatchConfig, on_batch=None):
        self.models, self.store, self.config = models, store, config
        self.on_batch = on_batch  # callback(batch size, n model rows, ORT seconds, store seconds)
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        # One worker: ORT already uses every intra-op thread it was given; a second concurrent
        # run would only compete for the same cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gru4rec-ort")
        self._task: asyncio.Task | None = None
        self._carry: deque[Event] = deque()  # events held back for the next batch (see _collect)
        self._last_size = 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def submit(self, session_id: int | str, item_id: int | str) -> Outcome:
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Event(session_id, item_id, fut))
        return await fut

    async def _collect(self) -> list[Event]:
        """Up to max_batch events, at most one per session: a second event of a session in the
        queue (possible only when its first one's request was cancelled and released the session
        lock early) waits for the next batch, as it needs the first one's output state."""
        queue, cfg = self._queue, self.config
        batch: list[Event] = []
        seen: set = set()
        later: list[Event] = []

        def add(ev: Event) -> None:
            key = (type(ev.session_id), ev.session_id)
            if key in seen:
                later.append(ev)
            else:
                seen.add(key)
                batch.append(ev)

        while self._carry and len(batch) < cfg.max_batch:
            add(self._carry.popleft())
        if not batch:
            add(await queue.get())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.max_wait_ms / 1000
        # The window closes early once the batch is as large as the previous one: under load the
        # clients answered by the last batch come back within the window, while an idle server
        # (previous batch of 1) never delays a lone request.
        enough = min(cfg.max_batch, self._last_size)
        while len(batch) < cfg.max_batch:
            if not queue.empty():
                add(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or len(batch) >= enough:
                break
            try:
                add(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        self._carry.extendleft(reversed(later))
        self._last_size = len(batch)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run(batch)
            except Exception as e:  # the store or ORT failed: fail this batch's requests, keep serving
                for ev in batch:
                    if not ev.future.done():
                        ev.future.set_exception(e)

    async def _run(self, batch: list[Event]) -> None:
        model = self.models.current
        shape, k = model.state_shape, model.top_k
        keys = [record_key(model.export_id, ev.session_id) for ev in batch]
        t0 = time.perf_counter()
        raws = await self.store.get_many(keys)
        state_s, model_s = time.perf_counter() - t0, 0.0
        records = [decode(raw, shape, k) for raw in raws]
        lookup = [model.lookup(ev.item_id) for ev in batch]  # None: unknown, state left unchanged
        rows = [i for i, idx in enumerate(lookup) if idx is not None]
        outcomes: dict[int, Outcome] = {}
        if rows:
            hidden = np.zeros((shape[0], len(rows), shape[1]), dtype=np.float32)
            for j, i in enumerate(rows):
                if records[i] is not None:
                    hidden[:, j] = records[i].hidden
            item_idx = np.array([lookup[i] for i in rows], dtype=np.int64)
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            res = await loop.run_in_executor(self._pool, model.step, item_idx, hidden)
            model_s = time.perf_counter() - t0
            writes = []
            for j, i in enumerate(rows):
                writes.append((keys[i], encode(res.hidden[:, j], res.topk_scores[j], res.topk_idx[j])))
                outcomes[i] = Outcome(model, res.topk_idx[j], res.topk_scores[j], False)
            t0 = time.perf_counter()
            await self.store.set_many(writes)  # before any future resolves: stored, then answered
            state_s += time.perf_counter() - t0
        empty = Outcome(model, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), True)
        for i, ev in enumerate(batch):
            out = outcomes.get(i)
            if out is None:  # unknown item: the current state's answer, or nothing for a new session
                rec = records[i]
                out = empty if rec is None else Outcome(model, rec.topk_idx, rec.topk_scores, True)
            if not ev.future.done():  # a cancelled request (client gone) has a done future
                ev.future.set_result(out)
        if self.on_batch is not None:
            self.on_batch(len(batch), len(rows), model_s, state_s)
