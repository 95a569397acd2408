"""Prometheus metrics of one server (prometheus-client), in a registry of its own so that several
apps in one process (the tests) never share counters.

Requests and their latency are recorded by the event routes (`serve.event_routes`) and, for every
other route, by a small ASGI wrapper around the FastAPI app, so 4xx answers produced before a handler
runs (validation, body limit, bad token) are counted too.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ROUTES = ("/v1/events", "/v1/events:batch", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


def route_label(path: str) -> str:
    """A bounded label set: known routes, the session route template, or 'other'."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions/{id}"
    return "other"


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "gru4rec_serve_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "gru4rec_serve_request_seconds",
            "Request latency in the server (receive to last byte sent)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gru4rec_serve_batch_size", "Events per micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "gru4rec_serve_model_seconds",
            "ONNX Runtime time per micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.state_seconds = Histogram(
            "gru4rec_serve_state_seconds",
            "State store time per micro-batch (read + write)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.events = Counter("gru4rec_serve_events", "Events applied (known items)", registry=r)
        self.unknown = Counter(
            "gru4rec_serve_unknown_items", "Events of items the model does not know", registry=r
        )
        self.sessions = Gauge(
            "gru4rec_serve_sessions",
            "Session records held (in-process store; with Redis: keys in its database)",
            registry=r,
        )
        self.model_info = Gauge(
            "gru4rec_serve_model_info", "The model in use (value 1), by export id", ["export_id"], registry=r
        )
        self.reloads = Counter(
            "gru4rec_serve_reloads", "Model reloads by result (ok / failed)", ["result"], registry=r
        )
        self._export_id: str | None = None

    def set_model(self, export_id: str) -> None:
        if self._export_id is not None:
            self.model_info.remove(self._export_id)
        self.model_info.labels(export_id).set(1)
        self._export_id = export_id

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def on_batch(self, size: int, known: int, model_s: float, state_s: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(model_s)
        self.state_seconds.observe(state_s)
        self.events.inc(known)
        if size > known:
            self.unknown.inc(size - known)


class RequestMetrics:
    """ASGI wrapper: counts every HTTP response by route and status and times it."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status[0], time.perf_counter() - t0)
