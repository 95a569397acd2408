"""Per-session ordering: a session's events are applied one at a time, in arrival order.

Each event holds its session's lock from before its state is read until its new state is
written, so a second event of the same session can never join the batch of the first (it needs
the first one's output state). asyncio locks wake waiters first-in first-out, so events that
arrive concurrently are applied in the order they reached the handler. A lock lives only while
some event of its session is in flight: the table holds in-flight sessions, not every session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class SessionLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
