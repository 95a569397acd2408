"""`gru4rec-cli bench serve`: load test of `serve` on this machine, as JSON.

Replays a test set's sessions against a server on the loopback interface (one it starts itself
unless `--url` names a running one) at each concurrency level: C clients, each replaying whole
sessions one event at a time (the next event is sent when the previous answer is in, as a user
would), over keep-alive connections (aiohttp). Every level is bounded in requests and seconds.
Reports events/s and client-side request latency p50/p95/p99, plus where the server's time went
(from its /metrics: mean batch, ONNX Runtime and state-store time per batch, server-side request
time; the rest of a request's latency is HTTP, JSON and the load generator).

Then the cost comparison with a stateless server, in this process without HTTP: the same
sessions, truncated to each length L, through the same ONNX graph at batch 1, either carrying the
hidden state (one model call per event) or re-running the whole prefix for every event from a
zero state (what a server that keeps no state must do: L(L+1)/2 calls per session).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from gru4rec.errors import UserError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
K = 20  # recommendations per request (the diginetica preset's top-k), at most the model's top-k
WARMUP_REQUESTS = 64


@dataclass
class BenchConfig:
    model: Path | None = None
    sessions: Path | None = None
    url: str | None = None
    out: Path | None = None
    concurrency: tuple[int, ...] = (1, 16, 64)
    max_requests: int = 20_000
    max_seconds: float = 30.0
    lengths: tuple[int, ...] = (5, 10, 20)
    stateless_sessions: int = 30
    max_batch: int = 64
    max_wait_ms: float = 1.0
    threads: int = 0
    provider: str = "cpu"


def check_loopback(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "http" or parsed.hostname not in LOOPBACK_HOSTS:
        raise UserError(f"--url must be http:// on the loopback interface (127.0.0.1), got {url!r}")
    return url.rstrip("/")


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p95": round(float(np.percentile(ms, 95)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
        "max": round(float(ms.max()), 3),
    }


def load_sessions(path: Path) -> list[list]:
    """Sessions of the test file as lists of item ids, in time order."""
    from gru4rec.data import ITEM, SESSION, read_events

    events = read_events(path)  # validated and ordered by session, time
    sids = events[SESSION].to_numpy()
    items = events[ITEM].to_list()
    starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
    bounds = np.r_[starts, len(items)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------- HTTP load
async def _load_level(
    url: str,
    sessions: list[list],
    concurrency: int,
    cfg: BenchConfig,
    tag: str,
    k: int,
    progress,
    server_pid: int | None = None,
):
    import aiohttp
    import orjson

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    state = {"next": 0, "sent": 0}
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def post(session_id: str, item) -> tuple[int, float]:
            body = orjson.dumps({"session_id": session_id, "item_id": item, "k": k})
            t0 = time.perf_counter()
            async with http.post(f"{url}/v1/events", data=body, headers=headers) as r:
                await r.read()
                return r.status, time.perf_counter() - t0

        for i in range(WARMUP_REQUESTS):  # connections, ORT first runs: not measured
            await post(f"{tag}-warmup-{i % 8}", sessions[i % len(sessions)][0])
        cpu0 = time.process_time(), process_cpu_seconds(server_pid) if server_pid else None

        deadline = time.monotonic() + cfg.max_seconds

        async def client() -> None:
            nonlocal errors
            while True:
                n = state["next"]
                state["next"] += 1
                items = sessions[n % len(sessions)]
                session_id = f"{tag}-{n}"  # a new id when the test set wraps around: fresh sessions
                for item in items:
                    if state["sent"] >= cfg.max_requests or time.monotonic() > deadline:
                        return
                    state["sent"] += 1
                    try:
                        status, seconds = await post(session_id, item)
                    except (aiohttp.ClientError, TimeoutError):
                        errors += 1
                        continue
                    statuses[status] = statuses.get(status, 0) + 1
                    latencies.append(seconds)
                    progress()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        server_cpu = process_cpu_seconds(server_pid) if server_pid else None
        loadgen_cpu = time.process_time() - cpu0[0]
    ok = statuses.get(200, 0)
    cpu_ms = {"load_generator": round(1000 * loadgen_cpu / max(ok, 1), 3)}
    if server_cpu is not None and cpu0[1] is not None:
        cpu_ms["server"] = round(1000 * (server_cpu - cpu0[1]) / max(ok, 1), 3)
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + errors,
        "ok": ok,
        "errors": errors,
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(elapsed, 3),
        "events_per_s": round(ok / elapsed, 1),
        "latency_ms": percentiles(latencies),
        "cpu_ms_per_event": cpu_ms,  # CPU time (all threads) per answered event, by process
    }


SCRAPED = {
    "gru4rec_serve_batch_size": "batch",
    "gru4rec_serve_model_seconds": "model",
    "gru4rec_serve_state_seconds": "state",
    "gru4rec_serve_request_seconds": "request",  # route /v1/events only
}


def _scrape(url: str) -> dict:
    """{'batch_sum': .., 'batch_count': .., 'model_sum': .., ...} from the server's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        short = SCRAPED.get(family.name)
        for sample in family.samples if short else ():
            if (
                sample.name.endswith(("_sum", "_count"))
                and sample.labels.get("route", "/v1/events") == "/v1/events"
            ):
                out[f"{short}_{sample.name.rsplit('_', 1)[1]}"] = sample.value
    return out


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc); None elsewhere. CPU time, unlike
    wall time, is what a request costs whatever else the machine is running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_breakdown(before: dict, after: dict) -> dict:
    """Where the server's time went during one level (from /metrics deltas)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches, requests = d.get("batch_count", 0), d.get("request_count", 0)
    if not batches or not requests:
        return {}
    return {
        "mean_batch": round(d["batch_sum"] / batches, 2),
        "ort_ms_per_batch": round(1000 * d["model_sum"] / batches, 3),
        "ort_ms_per_event": round(1000 * d["model_sum"] / d["batch_sum"], 3),
        "state_ms_per_batch": round(1000 * d["state_sum"] / batches, 3),
        "server_request_ms_mean": round(1000 * d["request_sum"] / requests, 3),
    }


# ---------------------------------------------------------------------------------------------- stateless
def stateful_vs_stateless(
    model, sessions: list[list], lengths: tuple[int, ...], n: int, progress
) -> list[dict]:
    """Per-event model cost carrying the state vs re-running the prefix, at each session length."""
    rows = []
    L_, H = model.state_shape
    for _ in range(20):  # ORT's first runs allocate: not measured
        model.step(np.zeros(1, np.int64), np.zeros((L_, 1, H), np.float32))
    for length in lengths:
        picked = []
        for items in sessions:
            idx = [i for i in map(model.lookup, items) if i is not None]
            if len(idx) >= length:
                picked.append(np.array(idx[:length], dtype=np.int64))
            if len(picked) == n:
                break
        if not picked:
            rows.append({"length": length, "sessions": 0, "note": "no test session this long"})
            continue
        agree, stateful_s, stateless_s = True, 0.0, 0.0
        # Session by session, stateful then stateless: on a shared machine both see the same load.
        for idx in picked:
            t0 = time.perf_counter()
            h = np.zeros((L_, 1, H), np.float32)
            stateful_top = []
            for t in range(length):
                res = model.step(idx[t : t + 1], h)
                h = res.hidden
                stateful_top.append(res.topk_idx[0])
            t1 = time.perf_counter()
            for t in range(length):
                h = np.zeros((L_, 1, H), np.float32)
                for u in range(t + 1):  # the whole prefix, from a zero state, for every event
                    res = model.step(idx[u : u + 1], h)
                    h = res.hidden
                agree &= bool(np.array_equal(res.topk_idx[0], stateful_top[t]))
            stateful_s += t1 - t0
            stateless_s += time.perf_counter() - t1
        progress()
        n_events = len(picked) * length
        rows.append(
            {
                "length": length,
                "sessions": len(picked),
                "events": n_events,
                "stateful_ms_per_event": round(1000 * stateful_s / n_events, 3),
                "stateless_ms_per_event": round(1000 * stateless_s / n_events, 3),
                "ratio": round(stateless_s / stateful_s, 2),
                "model_calls_per_event": {"stateful": 1.0, "stateless": (length + 1) / 2},
                "same_top_k": agree,
            }
        )
    return rows


def ort_step_ms(model, batches: tuple[int, ...], repeats: int = 30) -> dict:
    """Median time of one ONNX Runtime call of the serving graph at each batch size (no HTTP, no
    state store): the floor under the served latency, and batch / time the ceiling on events/s."""
    L_, H = model.state_shape
    out = {}
    for b in batches:
        idx = np.arange(b, dtype=np.int64) % len(model.bundle.items)
        h = np.zeros((L_, b, H), np.float32)
        for _ in range(3):
            model.step(idx, h)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.step(idx, h)
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        out[str(b)] = {"ms": round(ms, 3), "events_per_s": round(1000 * b / ms, 1)}
    return out


# ---------------------------------------------------------------------------------------------- driver
def _start_server(onnx: Path, cfg: BenchConfig) -> tuple[subprocess.Popen, str]:
    from gru4rec.serve.app import ServeConfig  # noqa: F401 -- fail here, not in the child, without the extra

    port = free_port()
    args = [
        sys.executable, "-m", "gru4rec.cli", "serve", "--model", str(onnx), "--port", str(port),
        "--provider", cfg.provider, "--threads", str(cfg.threads), "--max-batch", str(cfg.max_batch),
        "--max-wait-ms", str(cfg.max_wait_ms), "--reload-interval", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"bench serve: the server did not start: {proc.stderr.read().strip()[-500:]}")
        if _ready(url):
            return proc, url
        time.sleep(0.2)
    proc.kill()
    raise UserError("bench serve: the server was not ready after 300 s")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (a server finishes its requests), SIGKILL if it is still there after `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def _ready(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_bench(cfg: BenchConfig) -> dict:
    from rich.console import Console

    from gru4rec.bundle import read_metadata
    from gru4rec.io import check_output_file, scratch_dir, write_text_atomic
    from gru4rec.score.bench import _model, _sessions
    from gru4rec.serve.model import load_model

    url = check_loopback(cfg.url) if cfg.url else None
    if cfg.out is not None:
        check_output_file(cfg.out, inputs=(cfg.model, cfg.sessions))
    console = Console(stderr=True)
    with scratch_dir("gru4rec-bench-serve-") as tmp:
        with console.status("preparing model and sessions"):
            sessions_path, data_desc, train_path = _sessions(cfg.sessions, tmp)
            onnx, _, model_desc = _model(cfg.model, train_path, tmp)
            sessions = load_sessions(sessions_path)
        proc = None
        if url is None:
            with console.status("starting the server"):
                proc, url = _start_server(onnx, cfg)
        k = min(K, read_metadata(onnx)["top_k"])
        load_before = os.getloadavg()
        try:
            levels = _load_levels(url, sessions, cfg, k, proc, console)
        finally:
            if proc is not None:
                stop_process(proc)
        served = load_model(onnx, cfg.provider, cfg.threads)
    stateless, ort_steps = _offline_costs(served, sessions, cfg, console)
    result = _result(cfg, served, data_desc, model_desc, url if proc is None else None, k, load_before,
                     levels, ort_steps, stateless)  # fmt: skip
    if cfg.out is not None:
        write_text_atomic(cfg.out, json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {cfg.out}")
    return result


def _load_levels(url: str, sessions, cfg: BenchConfig, k: int, proc, console) -> list[dict]:
    """One bounded load level per concurrency, with the server's own breakdown of where time went."""
    from rich.progress import Progress

    tag = f"bench-{os.getpid()}-{int(time.time())}"
    levels = []
    for c in cfg.concurrency:
        before = _scrape(url)
        with Progress(console=console, transient=True) as bar:
            advance = bar.add_task(f"concurrency {c}", total=cfg.max_requests)
            level = asyncio.run(_load_level(url, sessions, c, cfg, f"{tag}-c{c}", k,
                                            lambda t=advance: bar.advance(t), proc and proc.pid))  # fmt: skip
        level["server"] = server_breakdown(before, _scrape(url))
        levels.append(level)
        lat = level["latency_ms"]
        console.print(
            f"concurrency {c:>3}: {level['events_per_s']:>8,.0f} events/s   latency p50 {lat.get('p50')} "
            f"p95 {lat.get('p95')} p99 {lat.get('p99')} ms   errors {level['errors']}   "
            f"CPU ms/event {level['cpu_ms_per_event']}, server {level['server']}"
        )
    return levels


def _offline_costs(served, sessions, cfg: BenchConfig, console) -> tuple[list[dict], dict]:
    """Stateful vs stateless cost per event, and the ORT call of the serving graph alone."""
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("stateful vs stateless", total=len(cfg.lengths))
        stateless = stateful_vs_stateless(
            served, sessions, cfg.lengths, cfg.stateless_sessions, lambda: bar.advance(task)
        )
    ort_steps = ort_step_ms(served, tuple(sorted({1, 16, cfg.max_batch})))
    console.print(
        "ORT serving graph alone: "
        + ", ".join(
            f"batch {b} {v['ms']:.2f} ms ({v['events_per_s']:,.0f} events/s)" for b, v in ort_steps.items()
        )
    )
    for row in stateless:
        if row.get("events"):
            console.print(
                f"length {row['length']:>3}: stateful {row['stateful_ms_per_event']:.3f} ms/event, "
                f"stateless {row['stateless_ms_per_event']:.3f} ms/event ({row['ratio']}x)"
            )
    return stateless, ort_steps


def _result(cfg: BenchConfig, served, data_desc, model_desc, external_url: str | None, k: int, load_before,
            levels, ort_steps, stateless) -> dict:  # fmt: skip
    from gru4rec.provenance import git_commit
    from gru4rec.score.bench import _cpu, _versions

    return {
        "benchmark": "serve",
        "machine": {
            "cpu": _cpu(),
            "provider": served.provider,
            "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],  # shared machines: context
            "note": "load generator, server and ONNX Runtime share this machine's cores",
        },
        "versions": _versions(),
        "commit": git_commit(),
        "data": data_desc,
        "model": {
            **model_desc,
            "n_items": len(served.bundle.items),
            "layers": list(served.bundle.layer_sizes),
        },
        "server": {
            "url": external_url or "started by the benchmark",
            "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms,
            "threads": cfg.threads,
            "state": "as the running server has it" if external_url else "memory",
        },
        "bounds": {"max_requests": cfg.max_requests, "max_seconds": cfg.max_seconds, "k": k},
        "levels": levels,
        "ort_step_alone": ort_steps,
        "stateful_vs_stateless": stateless,
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in asdict(cfg).items()},
    }
