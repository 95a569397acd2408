"""`gru4rec-cli serve` and `gru4rec-cli bench serve`."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from gru4rec.cli_options import BenchSessions, ExportedModel, OrtProvider, OrtThreads, options_in_place
from gru4rec.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SWITCH_INTERVAL_S = 0.0005
# ONNX Runtime and its batching in `serve`, also set on the server `bench serve` starts.
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Events per ONNX Runtime call at most.")]
MAX_WAIT_HELP = "How long the first event of a batch waits for more (0: take only what is already queued)."
MaxWaitMs = Annotated[float, typer.Option("--max-wait-ms", help=MAX_WAIT_HELP)]


@dataclass(frozen=True)
class OrtBatching:
    max_batch: int = 64
    max_wait_ms: float = 1.0
    provider: str = "auto"
    threads: int = 0


with_ort_batching = options_in_place(
    "ort", {"max_batch": MaxBatch, "max_wait_ms": MaxWaitMs, "provider": OrtProvider, "threads": OrtThreads}
)


def read_api_key(path: Path | None) -> str | None:
    """The bearer token in `path` (surrounding whitespace stripped); UserError if unreadable or empty."""
    if path is None:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise UserError(f"{path}: cannot read the API key file ({e.strerror or e})") from None
    if not key or any(c.isspace() for c in key):
        raise UserError(f"{path}: the API key file must hold one token without spaces")
    return key


def check_state_url(state: str | None) -> str | None:
    """'memory' / None, or a reachable redis:// URL; UserError otherwise (before the server binds)."""
    if state in (None, "", "memory"):
        return None
    if not state.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"--state must be 'memory' or redis://HOST:PORT/DB, got {state!r}")
    import redis

    try:
        redis.Redis.from_url(state, socket_connect_timeout=5, socket_timeout=5).ping()
    except (ValueError, redis.RedisError) as e:
        raise UserError(f"--state {state}: cannot reach Redis ({e})") from None
    return state


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


@with_ort_batching
def serve_cmd(
    model: ExportedModel,
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind; 127.0.0.1 (this machine only) unless you say otherwise.",
    ),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    state: str = typer.Option(
        "memory",
        "--state",
        help="Where session states live: 'memory' (in this process, bounded LRU + TTL) or redis://HOST:PORT/DB "
        "(Redis or Valkey, shared by replicas; give it a database of its own).",
    ),
    session_ttl: float = typer.Option(
        1800.0,
        "--session-ttl",
        help="Seconds after a session's last known event before its state expires.",
    ),
    max_sessions: int = typer.Option(
        100_000,
        "--max-sessions",
        help="In-process store only: sessions held at most (least recently written dropped first); "
        "~4*(layers*units+2*top_k) bytes each.",
    ),
    ort: OrtBatching = OrtBatching(),  # --max-batch, --max-wait-ms, --provider, --threads (with_ort_batching)
    reload_interval: float = typer.Option(
        2.0,
        "--reload-interval",
        help="Seconds between checks of the bundle's files for a new model (hot reload); 0: never reload.",
    ),
    api_key_file: Path | None = typer.Option(
        None,
        "--api-key-file",
        help="File holding a bearer token; when given, /v1/* and /metrics require 'Authorization: Bearer TOKEN'.",
    ),
    max_body_bytes: int = typer.Option(
        256 * 1024, "--max-body-bytes", help="Largest request body accepted (larger: 413)."
    ),
    max_batch_events: int = typer.Option(
        1000, "--max-batch-events", help="Events per POST /v1/events:batch at most."
    ),
    log_level: str = typer.Option(
        "warning", "--log-level", help="uvicorn log level (debug, info, warning, error)."
    ),
    access_log: bool = typer.Option(
        False, "--access-log/--no-access-log", help="Log every request (slower)."
    ),
) -> None:
    """Serve online recommendations from an exported model over HTTP (JSON API; schema at /docs).

    Each event advances its session's hidden state by one step of the exported graph and answers
    the top-k, the same lists `score --out` writes for the same events."""
    from gru4rec.serve.app import ServeConfig, create_app
    from gru4rec.serve.model import load_model

    _check_settings(port, session_ttl, max_sessions, ort, reload_interval, max_body_bytes, max_batch_events,
                    log_level)  # fmt: skip
    config = ServeConfig(
        model=model,
        state=check_state_url(state),
        session_ttl=session_ttl,
        max_sessions=max_sessions,
        reload_interval=reload_interval,
        api_key=read_api_key(api_key_file),
        max_body_bytes=max_body_bytes,
        max_batch_events=max_batch_events,
        **asdict(ort),
    )
    served = load_model(model, ort.provider, ort.threads)
    if host not in LOOPBACK:
        unguarded = "" if config.api_key else " and, without --api-key-file, open to anyone who reaches it"
        print(
            f"notice: binding {host}: the API is reachable from other machines{unguarded}",
            file=sys.stderr,
        )
    _run_server(create_app(config, served), served, host, port, log_level, access_log)


def _check_settings(port, session_ttl, max_sessions, ort, reload_interval, max_body_bytes, max_batch_events,
                    log_level) -> None:  # fmt: skip
    """The numbers of `serve` in range, before anything is opened."""
    checks = [
        (port, 0 < port < 65536, "--port must be 1..65535"),
        (session_ttl, session_ttl > 0, "--session-ttl must be positive"),
        (max_sessions, max_sessions > 0, "--max-sessions must be positive"),
        (ort.max_batch, 1 <= ort.max_batch <= 4096, "--max-batch must be 1..4096"),
        (ort.max_wait_ms, 0 <= ort.max_wait_ms <= 1000, "--max-wait-ms must be 0..1000"),
        (ort.threads, ort.threads >= 0, "--threads must be 0 or more"),
        (reload_interval, reload_interval >= 0, "--reload-interval must be 0 or more"),
        (max_body_bytes, max_body_bytes >= 1024, "--max-body-bytes must be at least 1024"),
        (max_batch_events, max_batch_events >= 1, "--max-batch-events must be positive"),
    ]
    for value, ok, message in checks:
        if not ok:
            raise UserError(f"{message}, got {value}")
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise UserError(f"--log-level must be one of debug, info, warning, error, got {log_level!r}")


def _run_server(app, served, host: str, port: int, log_level: str, access_log: bool) -> None:
    import uvicorn

    # ORT runs in a worker thread and needs the GIL back to hand its result over; with Python's
    # default 5 ms switch interval it can wait that long behind the busy event loop on every batch.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    print(
        f"serving export {served.export_id} ({len(served.bundle.items)} items, top-{served.top_k}, "
        f"ORT {served.provider}) on http://{host}:{port} (API docs: /docs)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command("serve")(bench_serve_cmd)


@with_ort_batching
def bench_serve_cmd(
    model: Path | None = typer.Option(
        None,
        "--model",
        help="m.onnx to serve; default: a random-weight diginetica-shaped model (43,097 items, 512 units).",
    ),
    sessions: BenchSessions = None,
    url: str | None = typer.Option(
        None,
        "--url",
        help="A running server (loopback only, e.g. http://127.0.0.1:8000) serving --model; "
        "default: start one for the benchmark and stop it afterwards.",
    ),
    out: Path | None = typer.Option(
        Path("bench/results/serve-cpu.json"), "--out", help="Write the results JSON here."
    ),
    concurrency: str = typer.Option(
        "1,16,64", "--concurrency", help="Comma-separated numbers of concurrent clients, one run each."
    ),
    requests: int = typer.Option(
        20_000, "--requests", help="Requests per concurrency level at most (bounded load)."
    ),
    seconds: float = typer.Option(30.0, "--seconds", help="Seconds per concurrency level at most."),
    lengths: str = typer.Option(
        "5,10,20", "--lengths", help="Session lengths of the stateful vs stateless comparison."
    ),
    stateless_sessions: int = typer.Option(
        30, "--stateless-sessions", help="Sessions per length in the stateful vs stateless comparison."
    ),
    ort: OrtBatching = OrtBatching(provider="cpu"),  # the started server's (with_ort_batching)
) -> None:
    """Load test of `serve` on this machine: events/s and latency p50/p95/p99 at each concurrency,
    plus the same sessions replayed statelessly (whole prefix per event) for the cost comparison.

    --max-batch, --max-wait-ms, --provider and --threads are those of the server it starts."""
    from gru4rec.serve.loadgen import BenchConfig, run_bench

    try:
        levels = tuple(int(x) for x in concurrency.split(",") if x.strip())
        lens = tuple(int(x) for x in lengths.split(",") if x.strip())
    except ValueError:
        raise UserError("--concurrency and --lengths take comma-separated integers") from None
    if not levels or min(levels) < 1 or max(levels) > 1024:
        raise UserError(f"--concurrency must list integers 1..1024, got {concurrency!r}")
    if not lens or min(lens) < 1 or max(lens) > 200:
        raise UserError(f"--lengths must list integers 1..200, got {lengths!r}")
    if requests < 1 or seconds <= 0 or stateless_sessions < 1:
        raise UserError("--requests, --seconds and --stateless-sessions must be positive")
    run_bench(
        BenchConfig(
            model=model,
            sessions=sessions,
            url=url,
            out=out,
            concurrency=levels,
            max_requests=requests,
            max_seconds=seconds,
            lengths=lens,
            stateless_sessions=stateless_sessions,
            **asdict(ort),
        )
    )
