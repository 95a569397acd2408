"""The HTTP API (FastAPI): events in, top-k recommendations out; OpenAPI schema at /docs.

    POST   /v1/events        {"session_id", "item_id", "k"?} -> the session's top-k after the event
    POST   /v1/events:batch  {"events": [...]} -> one result per event, in order
    DELETE /v1/sessions/{id} end a session (its state is dropped)
    GET    /healthz          the process is up
    GET    /readyz           model loaded and state store reachable
    GET    /metrics          Prometheus text format

Ids are the user's own type (integers or strings, as the model was trained); the answer's ids are
of that type too. An item the model does not know leaves the state unchanged and the answer comes
from the current state, flagged `unknown_item` (the rule `score` applies: such events are dropped);
a session with no known item yet gets an empty list. Malformed requests get a 4xx with a JSON
`error` message; only a failing state store or model gives 503.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import StringConstraints

from gru4rec.serve.batcher import BatchConfig, Batcher, ModelHolder, Outcome
from gru4rec.serve.event_routes import EventRoutes, Reply, require_token, served
from gru4rec.serve.metrics import RequestMetrics, ServeMetrics
from gru4rec.serve.model import ServedModel, load_model
from gru4rec.serve.ordering import SessionLocks
from gru4rec.serve.reload import Reloader
from gru4rec.serve.schema import INT64, MAX_ID_LENGTH, EventIn, add_event_routes_to_openapi, validation_error
from gru4rec.serve.state import open_store, record_key, session_key


@dataclass
class ServeConfig:
    model: Path
    state: str | None = None  # None: in-process; redis://HOST:PORT/DB: shared
    session_ttl: float = 1800.0
    max_sessions: int = 100_000  # in-process store only
    max_batch: int = 64
    max_wait_ms: float = 1.0
    provider: str = "cpu"
    threads: int = 0
    reload_interval: float = 2.0  # 0: no hot reload
    api_key: str | None = None
    max_body_bytes: int = 256 * 1024
    max_batch_events: int = 1000


def _json(payload, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class Service:
    """Everything a request needs: model holder, store, batcher, session locks, metrics."""

    def __init__(self, config: ServeConfig, model: ServedModel):
        self.config = config
        self.models = ModelHolder(model)
        self.metrics = ServeMetrics()
        self.metrics.set_model(model.export_id)
        self.locks = SessionLocks()
        self.store = None
        self.batcher: Batcher | None = None
        self.reloader: Reloader | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        cfg = self.config
        self.store = open_store(cfg.state, cfg.session_ttl, cfg.max_sessions)
        self.batcher = Batcher(
            self.models, self.store, BatchConfig(cfg.max_batch, cfg.max_wait_ms), self.metrics.on_batch
        )
        self.batcher.start()
        if cfg.reload_interval > 0:
            self.reloader = Reloader(
                cfg.model,
                self.models,
                lambda: load_model(cfg.model, cfg.provider, cfg.threads),
                cfg.reload_interval,
                self._on_reload,
            )
            self._tasks.append(asyncio.get_running_loop().create_task(self.reloader.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.batcher is not None:
            await self.batcher.stop()
        if self.store is not None:
            await self.store.close()

    def _on_reload(self, model: ServedModel | None, result: str) -> None:
        self.metrics.reloads.labels(result).inc()
        if model is not None:
            self.metrics.set_model(model.export_id)

    def check_event(self, ev: EventIn) -> int:
        """The k to answer with; a 422 Reply for a k or an item id type the model cannot take."""
        model = self.models.current
        if ev.k is not None and ev.k > model.top_k:
            message = f"k must be between 1 and the model's top-k ({model.top_k}), got {ev.k}"
            raise Reply(422, {"error": message})
        if (model.id_kind == "int") != isinstance(ev.item_id, int):
            kind = "integer" if model.id_kind == "int" else "string"
            raise Reply(422, {"error": f"item_id: the model was trained on {kind} item ids"})
        return ev.k or model.top_k

    async def apply(self, ev: EventIn, k: int) -> dict:
        async with self.locks.hold(session_key(ev.session_id)):
            out: Outcome = await self.batcher.submit(ev.session_id, ev.item_id)
        return {
            "session_id": ev.session_id,
            "item_id": ev.item_id,
            "items": out.model.item_ids(out.topk_idx[:k]),
            "scores": out.topk_scores[:k].tolist(),
            "model": out.model.export_id,
            "unknown_item": out.unknown_item,
        }


def create_app(config: ServeConfig, model: ServedModel | None = None) -> EventRoutes:
    """The ASGI app for `config`; `model` already loaded (the CLI loads it first to fail before binding).

    The event routes are served by `EventRoutes` in front of a FastAPI app that has the rest."""
    service = Service(config, model or load_model(config.model, config.provider, config.threads))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="gru4rec serve",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else "",
        version="1",
        lifespan=lifespan,
        max_body_size=config.max_body_bytes,  # 413 past it, counted as the body arrives (chunked too)
        # /metrics is the server's telemetry; FastAPI's OpenTelemetry hooks would cost every request
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.service = service
    guarded = _guard(config)
    _add_error_handlers(app)
    _add_session_route(app, service, guarded)
    _add_operations_routes(app, service, guarded)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = add_event_routes_to_openapi(generate(), config.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi
    return EventRoutes(app, service, config)


def _guard(config: ServeConfig) -> list:
    """The bearer-token dependency of the guarded routes (none without --api-key-file: no per-request cost)."""
    if config.api_key is None:
        return []

    async def check_token(request: Request) -> None:
        require_token(request.headers.get("authorization", ""), config.api_key)

    return [Depends(check_token)]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _json(validation_error(list(exc.errors())), 422)

    @app.exception_handler(Reply)
    async def on_reply(request: Request, reply: Reply) -> Response:
        response = _json(reply.body, reply.status)
        for k, v in reply.headers:
            response.headers[k.decode()] = v.decode()
        return response

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        response = _error(exc.status_code, str(exc.detail))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response


def _add_session_route(app: FastAPI, service: Service, guarded: list) -> None:
    @app.delete("/v1/sessions/{session_id}", dependencies=guarded)
    async def delete_session(
        session_id: Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)],
    ) -> Response:
        """End a session. The id is matched as a string and, when it is an integer literal, as an integer."""
        ids: list[int | str] = [session_id]
        with contextlib.suppress(ValueError):
            if -INT64 <= int(session_id) < INT64:
                ids.append(int(session_id))

        async def run() -> dict:
            export_id = service.models.current.export_id
            deleted = 0
            for sid in ids:
                async with service.locks.hold(session_key(sid)):
                    deleted += await service.store.delete([record_key(export_id, sid)])
            return {"session_id": session_id, "deleted": deleted > 0}

        return _json(await served(run()))


def _add_operations_routes(app: FastAPI, service: Service, guarded: list) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        """The process is up and answering."""
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready to serve: a model is loaded and the state store answers."""
        try:
            await asyncio.wait_for(service.store.ping(), 2)
        except Exception as e:
            return _error(503, f"state store unavailable: {type(e).__name__}")
        return _json({"status": "ready", "model": service.models.current.export_id})

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with contextlib.suppress(Exception):  # a store that does not answer leaves the last value
            service.metrics.sessions.set(await asyncio.wait_for(service.store.count(), 2))
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
