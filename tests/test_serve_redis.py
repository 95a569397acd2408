"""Shared state in a real Redis: two `gru4rec-cli serve` processes serve one session alternately,
and a server killed with SIGKILL under load is restarted with every session where it was.

redis-server (Debian package) is started by the `redis_url` fixture on a free loopback port and
skipped cleanly where the binary is absent. Answers are compared with `score --out`.
"""

from __future__ import annotations

import asyncio

import httpx
from serve_util import (
    HTTP_TIMEOUT,
    ServerProcess,
    check_against_offline,
    known_ids,
    sessions_in_order,
)

PROBE = 987_654_321  # an item no model here knows: answers the current state, changes nothing


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


def start_all(*servers: ServerProcess) -> None:
    """Start server processes side by side (their imports overlap) and wait for each."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(ServerProcess.start, servers))


def test_two_replicas_share_sessions_through_redis(int_model, redis_url):
    """Every event of a session goes to the other replica than the one before: per event the lists
    of `score --out`, so each replica continued exactly the state the other one wrote."""
    state = with_db(redis_url, 1)
    a = ServerProcess(int_model["onnx"], "--state", state)
    b = ServerProcess(int_model["onnx"], "--state", state)
    sessions = sessions_in_order(int_model["events"])
    try:
        start_all(a, b)
        online: dict = {}

        async def replay(sid, items, client_a, client_b, limit):
            async with limit:
                for j, item in enumerate(items):
                    client = client_a if j % 2 == 0 else client_b
                    r = await client.post("/v1/events", json={"session_id": sid, "item_id": item})
                    assert r.status_code == 200, r.text
                    online[(sid, j)] = r.json()

        async def main():
            limit = asyncio.Semaphore(8)
            async with (
                httpx.AsyncClient(base_url=a.url, timeout=HTTP_TIMEOUT) as ca,
                httpx.AsyncClient(base_url=b.url, timeout=HTTP_TIMEOUT) as cb,
            ):
                await asyncio.gather(*(replay(s, items, ca, cb, limit) for s, items in sessions.items()))

        asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    counts = check_against_offline(sessions, online, int_model["offline"], known_ids(int_model))
    print(f"two replicas alternating over Redis: {counts}")


def test_kill9_under_load_then_restart_continues_every_session(int_model, redis_url):
    """SIGKILL while the sessions are replayed concurrently; a restarted server (same Redis) holds
    every acknowledged event: an unknown-item probe answers the last acknowledged list (or, when the
    event in flight at the kill had been stored, its list), and the rest of each session then gives
    `score --out`'s lists."""
    state = with_db(redis_url, 2)
    sessions = {s: items for s, items in sessions_in_order(int_model["events"]).items() if len(items) >= 5}
    total = sum(map(len, sessions.values()))
    server = ServerProcess(int_model["onnx"], "--state", state)
    online: dict = {}
    next_event: dict = {}  # session -> index of its first event without an answer
    acked = [0]
    try:
        start_all(server)

        async def replay(sid, items, client):
            for j, item in enumerate(items):
                next_event[sid] = j
                try:
                    r = await client.post("/v1/events", json={"session_id": sid, "item_id": item})
                except httpx.HTTPError:
                    return  # the server is gone: this event may or may not have been stored
                assert r.status_code == 200, r.text
                online[(sid, j)] = r.json()
                acked[0] += 1
                if acked[0] == total // 2:
                    server.kill9()
            next_event[sid] = len(items)

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=HTTP_TIMEOUT) as client:
                await asyncio.gather(*(replay(s, items, client) for s, items in sessions.items()))

        asyncio.run(main())
        assert server.proc.returncode == -9
        interrupted = [s for s, j in next_event.items() if j < len(sessions[s])]
        assert len(interrupted) >= 8  # the kill came while most sessions were mid-way

        restarted = ServerProcess(int_model["onnx"], "--state", state)
        start_all(restarted)
        in_flight_stored = 0
        try:
            with httpx.Client(base_url=restarted.url, timeout=HTTP_TIMEOUT) as client:
                for sid in interrupted:
                    j = next_event[sid]
                    probe = client.post("/v1/events", json={"session_id": sid, "item_id": PROBE}).json()
                    assert probe["unknown_item"] is True
                    last = next((online[(sid, i)] for i in range(j - 1, -1, -1) if (sid, i) in online), None)
                    want = last["items"] if last else []
                    if probe["items"] != want:  # the event in flight was stored before the kill
                        online[(sid, j)] = {**probe, "item_id": sessions[sid][j], "unknown_item": False}
                        in_flight_stored += 1
                        j += 1
                    for i in range(j, len(sessions[sid])):
                        r = client.post("/v1/events", json={"session_id": sid, "item_id": sessions[sid][i]})
                        assert r.status_code == 200, r.text
                        online[(sid, i)] = r.json()
        finally:
            restarted.stop()
    finally:
        server.stop()
    counts = check_against_offline(sessions, online, int_model["offline"], known_ids(int_model))
    print(
        f"kill -9 after {total // 2} of {total} events: {len(interrupted)} sessions interrupted, "
        f"{in_flight_stored} in-flight events had been stored, all continued: {counts}"
    )
