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
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints

from gru4rec.serve.batcher import BatchConfig, Batcher, ModelHolder, Outcome
from gru4rec.serve.metrics import RequestMetrics, ServeMetrics
from gru4rec.serve.model import ServedModel, load_model
from gru4rec.serve.ordering import SessionLocks
from gru4rec.serve.reload import Reloader
from gru4rec.serve.state import open_store, record_key, session_key

log = logging.getLogger("gru4rec.serve")

MAX_ID_LENGTH = 256  # characters of a string id; longer ones are refused (422)
INT64 = 2**63
# Integer ids are int64 (as the item map and score store them); string ids 1..MAX_ID_LENGTH characters.
Id = (
    Annotated[StrictInt, Field(ge=-INT64, lt=INT64)]
    | Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
)


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


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: Id = Field(description="The session's id: an integer or a string (max 256 characters).")
    item_id: Id = Field(description="The item the user interacted with, in the model's id type.")
    k: StrictInt | None = Field(
        None, ge=1, description="How many recommendations (1..the model's top-k; default: its top-k)."
    )


class EventOut(BaseModel):
    session_id: Id
    item_id: Id
    items: list[Id] = Field(description="Top-k item ids, best first (empty: no known item yet).")
    scores: list[float] = Field(description="Their scores (raw logits of the model).")
    model: str = Field(description="Export id of the model that answered.")
    unknown_item: bool = Field(description="The model does not know item_id: the state was left unchanged.")


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, description="Events, applied in list order per session.")


class BatchOut(BaseModel):
    results: list[EventOut]


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
        """The k to answer with; HTTPException 422 for a k or an item id type the model cannot take."""
        model = self.models.current
        if ev.k is not None and ev.k > model.top_k:
            raise HTTPException(422, f"k must be between 1 and the model's top-k ({model.top_k}), got {ev.k}")
        if (model.id_kind == "int") != isinstance(ev.item_id, int):
            kind = "integer" if model.id_kind == "int" else "string"
            raise HTTPException(422, f"item_id: the model was trained on {kind} item ids")
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


def create_app(config: ServeConfig, model: ServedModel | None = None) -> FastAPI:
    """The app for `config`; `model` already loaded (the CLI loads it first to fail before binding)."""
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
    )
    app.state.service = service
    guarded = _guard(config)
    _add_error_handlers(app)
    _add_event_routes(app, service, config, guarded)
    _add_operations_routes(app, service, guarded)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


def _guard(config: ServeConfig) -> list:
    """The bearer-token dependency of the guarded routes (none without --api-key-file: no per-request cost)."""
    if config.api_key is None:
        return []

    async def authorized(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return [Depends(authorized)]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        # The message names the field and the problem but never echoes the input (it may be huge).
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200]}
            for e in exc.errors()[:10]
        ]
        where = ".".join(x for x in errors[0]["loc"] if x != "body" and not x.isdigit()) if errors else ""
        head = f"{where or 'body'}: {errors[0]['msg']}" if errors else "unreadable body"
        return _json({"error": f"invalid request: {head}", "detail": errors}, 422)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        response = _error(exc.status_code, str(exc.detail))
        for k, v in (exc.headers or {}).items():
            response.headers[k] = v
        return response


async def _answer(coro) -> Response:
    try:
        return _json(await coro)
    except HTTPException:
        raise
    except Exception as e:  # the state store or the model failed, not the request
        log.error("request failed: %s: %s", type(e).__name__, e)
        return _error(503, f"service unavailable: {type(e).__name__}")


def _add_event_routes(app: FastAPI, service: Service, config: ServeConfig, guarded: list) -> None:
    @app.post("/v1/events", response_model=EventOut, dependencies=guarded)
    async def post_event(event: EventIn) -> Response:
        """Apply one event to its session; answer the session's top-k after it."""
        k = service.check_event(event)
        return await _answer(service.apply(event, k))

    @app.post("/v1/events:batch", response_model=BatchOut, dependencies=guarded)
    async def post_events(batch: BatchIn) -> Response:
        """Apply many events (sessions in any mix); each session's events in list order."""
        if len(batch.events) > config.max_batch_events:
            raise HTTPException(413, f"at most {config.max_batch_events} events per batch request")
        ks = [service.check_event(ev) for ev in batch.events]

        async def run() -> dict:
            # Tasks start in list order, so each session's events take its lock in list order.
            results = await asyncio.gather(*(service.apply(ev, k) for ev, k in zip(batch.events, ks)))
            return {"results": list(results)}

        return await _answer(run())

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

        return await _answer(run())


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
