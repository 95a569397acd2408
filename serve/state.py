"""Session state stores: in-process (bounded LRU + TTL) or Redis/Valkey (shared by replicas).

A session's record is raw little-endian bytes: its hidden state float32 [L, H], then the top-k of
its last known event (scores float32 [K], item indices int32 [K]). The top-k is kept so that an
event of an unknown item, which leaves the state unchanged (the rule `score` applies: such events
are dropped), can answer from the current state without a model call. The model's export id is
part of the key: after a reload to another export, old records are simply not found (the session
starts fresh, as its state may have another shape or meaning) and expire by their TTL.

Redis records are written with `SET ... EX ttl` before the response is sent, so any replica can
continue any session and a restarted server loses no acknowledged event. The TTL counts from the
session's last known event in both stores.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

KEY_PREFIX = "gru4rec:"


def session_key(session_id: int | str) -> str:
    """Integer and string ids never collide: 5 and "5" are different sessions."""
    return f"i:{session_id}" if isinstance(session_id, int) else f"s:{session_id}"


def record_key(export_id: str, session_id: int | str) -> str:
    return f"{KEY_PREFIX}{export_id}:{session_key(session_id)}"


@dataclass
class Record:
    hidden: np.ndarray  # float32 [L, H]
    topk_scores: np.ndarray  # float32 [K]
    topk_idx: np.ndarray  # int32 [K]


def encode(hidden: np.ndarray, topk_scores: np.ndarray, topk_idx: np.ndarray) -> bytes:
    return b"".join(
        (
            np.ascontiguousarray(hidden, dtype="<f4").tobytes(),
            np.ascontiguousarray(topk_scores, dtype="<f4").tobytes(),
            np.ascontiguousarray(topk_idx, dtype="<i4").tobytes(),
        )
    )


def decode(raw: bytes | None, shape: tuple[int, int], k: int) -> Record | None:
    """None for a missing record or one of another size (written by another model: start fresh)."""
    n_hidden = shape[0] * shape[1]
    if raw is None or len(raw) != 4 * (n_hidden + 2 * k):
        return None
    flat = np.frombuffer(raw, dtype="<f4")
    return Record(
        hidden=flat[:n_hidden].reshape(shape),
        topk_scores=flat[n_hidden : n_hidden + k],
        topk_idx=np.frombuffer(raw, dtype="<i4", offset=4 * (n_hidden + k)),
    )


class StateStore(Protocol):
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...
    async def set_many(self, items: list[tuple[str, bytes]]) -> None: ...
    async def delete(self, keys: list[str]) -> int: ...
    async def count(self) -> int: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """In-process records: at most `max_sessions` (least recently written evicted first), each
    expiring `ttl` seconds after its last write. Writes move a record to the end, so the front
    holds the oldest writes and expiry is a pop from the front (amortised O(1) per write)."""

    def __init__(self, max_sessions: int, ttl: float):
        self.max_sessions, self.ttl = int(max_sessions), float(ttl)
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for k in keys:
            entry = self._data.get(k)
            out.append(entry[1] if entry is not None and entry[0] > now else None)
        return out

    async def set_many(self, items: list[tuple[str, bytes]]) -> None:
        now = time.monotonic()
        for k, v in items:
            self._data[k] = (now + self.ttl, v)
            self._data.move_to_end(k)
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        data = self._data
        while data and (len(data) > self.max_sessions or next(iter(data.values()))[0] <= now):
            data.popitem(last=False)

    async def delete(self, keys: list[str]) -> int:
        return sum(self._data.pop(k, None) is not None for k in keys)

    async def count(self) -> int:
        self._sweep(time.monotonic())
        return len(self._data)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()


class RedisStore:
    """Records in Redis or Valkey (`redis://HOST:PORT/DB`): one MGET per batch to read, one
    pipelined batch of `SET key value EX ttl` to write."""

    def __init__(self, url: str, ttl: float):
        import redis.asyncio as aioredis

        self.url, self.ttl = url, max(1, int(round(ttl)))
        # Timeouts: a stalled Redis fails requests (503) instead of hanging them.
        self._redis = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self._redis.mget(keys) if keys else []

    async def set_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        pipe = self._redis.pipeline(transaction=False)
        for k, v in items:
            pipe.set(k, v, ex=self.ttl)
        await pipe.execute()

    async def delete(self, keys: list[str]) -> int:
        return int(await self._redis.delete(*keys)) if keys else 0

    async def count(self) -> int:
        """Keys in the database: give the server a database of its own (the /DB of the URL)."""
        return int(await self._redis.dbsize())

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(state: str | None, ttl: float, max_sessions: int) -> StateStore:
    """`None` or 'memory' -> MemoryStore; 'redis://...' / 'rediss://...' / 'unix://...' -> RedisStore."""
    if state in (None, "", "memory"):
        return MemoryStore(max_sessions, ttl)
    return RedisStore(state, ttl)
