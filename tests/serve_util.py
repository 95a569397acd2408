"""Helpers of the serve tests: real servers on free loopback ports, a real redis-server, tiny
exported models, `score --out` as the offline reference, and the list comparison.

Every wait is bounded; every process or thread started here is stopped by its fixture.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from conftest import REPO, run_cli

from gru4rec.serve.loadgen import free_port, stop_process

HTTP_TIMEOUT = 20.0  # seconds, every HTTP call
START_TIMEOUT = 90.0  # a server process imports torch/onnx/fastapi: slow on a busy 2-core machine
SCORE_TOL = 1e-5


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ---------------------------------------------------------------------------------------------- servers
class ServerThread:
    """The app under uvicorn in a thread of this process (fast to start; same code path as the CLI)."""

    def __init__(self, config):
        import uvicorn

        from gru4rec.serve.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started, START_TIMEOUT, "the server thread to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server thread did not stop"


class ServerProcess:
    """`gru4rec-cli serve` as a separate process (what kill -9 needs)."""

    def __init__(self, model: str | Path, *options: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "gru4rec.cli", "serve", "--model", str(model),
                     "--port", str(self.port), "--provider", "cpu", "--threads", "1", *options]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            if healthy(self.url):
                return self
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server on port {self.port} not ready after {START_TIMEOUT:.0f} s")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def start_redis(directory: Path):
    """A real redis-server on a free loopback port (no persistence); skip when it is not installed."""
    import redis

    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(up, 30, "redis-server to answer")
    except AssertionError:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc, f"redis://127.0.0.1:{port}/0"


# ---------------------------------------------------------------------------------------------- models
def build_model(root: Path, kind: str, n_items: int = 60, top_k: int = 10, seed: int = 7) -> dict:
    """A tiny exported model with `kind` ('int' or 'str') ids and test events for it, ~8% of them
    of items the model does not know (score drops them; the server flags them)."""
    from test_replay import make_model, random_events
    from test_score import export_model

    from gru4rec.items import ItemMap

    root.mkdir(parents=True, exist_ok=True)
    ints = np.arange(1000, 1000 + n_items, dtype=np.int64)
    ids = ints if kind == "int" else np.array([f"item-{i}" for i in ints], dtype=object)
    onnx = export_model(make_model(n_items, seed=seed), ItemMap(ids), root, top_k)
    events = random_events(60, n_items, seed=seed + 1)
    rng = np.random.default_rng(seed)
    unknown = rng.random(events.height) < 0.08
    events = events.with_columns(
        pl.when(pl.Series(unknown))
        .then(pl.col("item_id") + 10_000)
        .otherwise(pl.col("item_id"))
        .alias("item_id")
    )
    if kind == "str":
        events = events.with_columns(
            pl.format("item-{}", "item_id").alias("item_id"),
            pl.format("sess-{}", "session_id").alias("session_id"),
        )
    path = root / "test.parquet"
    events.write_parquet(path)
    return {"root": root, "onnx": onnx, "sessions": path, "events": events, "top_k": top_k, "kind": kind}


def offline_recs(model: dict, out: Path) -> dict:
    """`gru4rec-cli score --out` (the offline path) -> {(session_id, position): (ids, scores)}."""
    run_cli(
        "score", "--model", model["onnx"], "--sessions", model["sessions"], "--out", out,
        "--k", model["top_k"], "--provider", "cpu", "--batch-size", 16, check=True,
    )  # fmt: skip
    recs = pl.read_parquet(out)
    return {
        (row["session_id"], row["position"]): (row["rec_item_ids"], row["rec_scores"])
        for row in recs.iter_rows(named=True)
    }


def sessions_in_order(events: pl.DataFrame) -> dict:
    """{session_id: [item ids in time order]} (the order score replays them in)."""
    ev = events.sort(["session_id", "time"], maintain_order=True)
    return {sid: g["item_id"].to_list() for (sid,), g in ev.group_by(["session_id"], maintain_order=True)}


def compare_lists(got_ids, got_scores, want_ids, want_scores, tol: float = SCORE_TOL) -> int:
    """Number of adjacent swaps between two top-k lists; AssertionError unless they are the same ids
    in the same order with scores within `tol`, up to swaps of neighbours whose scores differ by < tol."""
    got_ids, want_ids = list(got_ids), list(want_ids)
    assert len(got_ids) == len(want_ids), (got_ids, want_ids)
    np.testing.assert_allclose(np.asarray(got_scores), np.asarray(want_scores), rtol=0, atol=tol)
    swaps, i = 0, 0
    while i < len(got_ids):
        if got_ids[i] == want_ids[i]:
            i += 1
            continue
        ok = (
            i + 1 < len(got_ids)
            and got_ids[i] == want_ids[i + 1]
            and got_ids[i + 1] == want_ids[i]
            and abs(want_scores[i] - want_scores[i + 1]) < tol
        )
        assert ok, f"lists differ at {i}: {got_ids} vs {want_ids}"
        swaps += 1
        i += 2
    return swaps


# ---------------------------------------------------------------------------------------------- replay
def known_ids(m: dict) -> set:
    from gru4rec.bundle import load_bundle

    return set(load_bundle(m["onnx"]).items.ids.tolist())


async def replay_http(url: str, sessions: dict, k: int, concurrency: int = 16) -> dict:
    """Every session's events through the API, sessions interleaved and concurrent: half of them one
    POST /v1/events per event, the other half in POST /v1/events:batch requests that mix the events
    of 4 sessions (so one request holds several events of each session, which must apply in order).
    -> {(session_id, event index): response}."""
    results: dict = {}
    ids = list(sessions)
    singles, grouped = ids[::2], ids[1::2]
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT) as client:

        async def one_by_one(sid):
            async with limit:
                for j, item in enumerate(sessions[sid]):
                    r = await client.post("/v1/events", json={"session_id": sid, "item_id": item, "k": k})
                    assert r.status_code == 200, r.text
                    results[(sid, j)] = r.json()

        async def in_batches(group):
            async with limit:
                order = [(sid, j) for j in range(max(len(sessions[s]) for s in group)) for sid in group]
                order = [(sid, j) for sid, j in order if j < len(sessions[sid])]
                for start in range(0, len(order), 7):  # several requests, each mixing sessions
                    part = order[start : start + 7]
                    body = {"events": [{"session_id": s, "item_id": sessions[s][j], "k": k} for s, j in part]}
                    r = await client.post("/v1/events:batch", json=body)
                    assert r.status_code == 200, r.text
                    for key, res in zip(part, r.json()["results"], strict=True):
                        results[key] = res

        groups = [grouped[i : i + 4] for i in range(0, len(grouped), 4)]
        await asyncio.gather(*map(one_by_one, singles), *map(in_batches, groups))
    return results


def check_against_offline(sessions: dict, online: dict, offline: dict, known: set) -> dict:
    """Each known event's answer vs score's row for it; an unknown event answers the session's last
    answer (empty before any known item). -> counts."""
    counts = {"compared": 0, "swaps": 0, "unknown": 0, "last_events": 0}
    for sid, items in sessions.items():
        position, last = 0, None
        n_known = sum(item in known for item in items)
        for j, item in enumerate(items):
            res = online[(sid, j)]
            assert res["session_id"] == sid and res["item_id"] == item
            if item not in known:
                counts["unknown"] += 1
                assert res["unknown_item"] is True
                want = last or {"items": [], "scores": []}
                assert res["items"] == want["items"] and res["scores"] == want["scores"]
                continue
            assert res["unknown_item"] is False
            if position < n_known - 1:  # score has a row for every known event but the last
                ids, scores = offline[(sid, position)]
                counts["swaps"] += compare_lists(res["items"], res["scores"], ids, scores)
                counts["compared"] += 1
            else:
                counts["last_events"] += 1
            position, last = position + 1, res
    assert counts["compared"] == sum(key[0] in sessions for key in offline)  # every row of score --out
    return counts
