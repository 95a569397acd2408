"""serve/state.py and serve/ordering.py on their own: record encoding, the in-process store's bounds
(LRU and TTL, with a fake clock: no sleeping), per-session arrival order under concurrency."""

from __future__ import annotations

import asyncio

import numpy as np

from gru4rec.serve import state as st
from gru4rec.serve.ordering import SessionLocks


def test_record_round_trip_and_size_check():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 8)).astype(np.float32)
    scores, idx = rng.standard_normal(5).astype(np.float32), np.arange(5, dtype=np.int64) * 7
    raw = st.encode(hidden, scores, idx)
    assert len(raw) == 4 * (16 + 10)
    rec = st.decode(raw, (2, 8), 5)
    assert np.array_equal(rec.hidden, hidden) and np.array_equal(rec.topk_scores, scores)
    assert rec.topk_idx.tolist() == idx.tolist()
    assert st.decode(raw, (1, 8), 5) is None and st.decode(None, (2, 8), 5) is None  # other model: fresh


def test_keys_keep_int_and_string_ids_apart_and_carry_the_export():
    assert st.record_key("e1", 5) != st.record_key("e1", "5")
    assert st.record_key("e1", 5) != st.record_key("e2", 5)


def test_memory_store_is_bounded_and_expires(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: now[0])
    store = st.MemoryStore(max_sessions=3, ttl=10)

    async def run():
        await store.set_many([("a", b"1"), ("b", b"2"), ("c", b"3")])
        await store.set_many([("a", b"1b"), ("d", b"4")])  # 'b' is the least recently written
        assert await store.get_many(["a", "b", "c", "d"]) == [b"1b", None, b"3", b"4"]
        now[0] += 9.5
        await store.set_many([("c", b"3b")])  # c's TTL restarts; a and d expire at 1010
        now[0] += 1.0
        assert await store.get_many(["a", "c", "d"]) == [None, b"3b", None]
        assert await store.count() == 1
        assert await store.delete(["c", "zz"]) == 1 and await store.count() == 0

    asyncio.run(run())


def test_session_events_apply_in_arrival_order_and_locks_are_released():
    locks, applied = SessionLocks(), []

    async def event(session: str, n: int):
        async with locks.hold(session):
            await asyncio.sleep(0.001 * ((n * 7) % 3))  # later events may finish their wait first
            applied.append((session, n))

    async def run():
        await asyncio.gather(*(event(f"s{n % 3}", n) for n in range(30)))

    asyncio.run(run())
    for s in ("s0", "s1", "s2"):
        got = [n for sess, n in applied if sess == s]
        assert got == sorted(got) and len(got) == 10
    assert len(locks) == 0
