"""`POST /v1/events` and `POST /v1/events:batch` as plain ASGI endpoints, in front of the FastAPI app.

These two routes are the server's whole load, and the event loop that handles them is one thread.
Through FastAPI's router a request crossed a dozen middleware layers and dependency resolution, and
its JSON was parsed into Python objects before being validated again; that cost the loop more CPU
than the model's step costs per event, so it bounded the rate (`bench serve` figures in
docs/performance.md). Here a request is: the body read against the size limit, the bearer token
checked, one pydantic `model_validate_json` with the same models (`serve.schema`, hence the same
rules), the service call, one orjson response, and the request metrics. Every other route (sessions,
health, metrics, `/docs`, whose schema describes these two from the same models) is FastAPI's.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
from pydantic import ValidationError

from gru4rec.serve.schema import EVENT_ROUTES, BatchIn, EventIn, validation_error

log = logging.getLogger("gru4rec.serve")
JSON = (b"content-type", b"application/json")


class Reply(Exception):
    """An answer other than 200, raised anywhere in the handling of a request (`Service.check_event`
    too); the FastAPI routes answer it through an exception handler."""

    def __init__(self, status: int, body: dict, headers: tuple = ()):
        self.status, self.body, self.headers = status, body, headers


def require_token(header: str, api_key: str) -> None:
    """A 401 Reply unless `header` is `Bearer <api_key>` (compared in constant time): every guarded
    route's check, the event routes' and FastAPI's."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise Reply(401, {"error": "missing or wrong bearer token"}, ((b"www-authenticate", b"Bearer"),))


class EventRoutes:
    """ASGI app: the event routes here, anything else to `app` (the FastAPI app)."""

    def __init__(self, app, service, config):
        self.app, self.service, self.config = app, service, config

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path not in EVENT_ROUTES:
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status, headers = 200, ()
        try:
            if scope["method"] != "POST":
                raise Reply(405, {"error": f"{scope['method']} {path}: only POST"}, ((b"allow", b"POST"),))
            self._check_token(scope)
            body = await self._read_body(scope, receive)
            payload = await (self._one(body) if path == "/v1/events" else self._batch(body))
        except Reply as r:
            status, payload, headers = r.status, r.body, r.headers
        data = orjson.dumps(payload)
        start = [JSON, (b"content-length", str(len(data)).encode()), *headers]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": data})
        self.service.metrics.observe_request(path, status, time.perf_counter() - t0)

    def _check_token(self, scope) -> None:
        if self.config.api_key is None:
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        require_token(header.decode("latin-1"), self.config.api_key)

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, refused (413) as soon as it is known to pass the limit, chunked or not."""
        limit = self.config.max_body_bytes
        too_large = Reply(413, {"error": f"request body larger than {limit} bytes"})
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Reply(400, {"error": "client disconnected"})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _one(self, body: bytes) -> dict:
        event = parse(EventIn, body)
        return await served(self.service.apply(event, self.service.check_event(event)))

    async def _batch(self, body: bytes) -> dict:
        batch = parse(BatchIn, body)
        if len(batch.events) > self.config.max_batch_events:
            raise Reply(413, {"error": f"at most {self.config.max_batch_events} events per batch request"})
        ks = [self.service.check_event(ev) for ev in batch.events]
        # Tasks start in list order, so each session's events take its lock in list order.
        run = asyncio.gather(*(self.service.apply(ev, k) for ev, k in zip(batch.events, ks)))
        return {"results": list(await served(run))}


async def served(awaitable):
    """The awaitable's result; a 503 Reply when it fails (the state store or the model, not the request:
    every check of the request has raised its own 4xx Reply before)."""
    try:
        return await awaitable
    except Exception as e:
        log.error("request failed: %s: %s", type(e).__name__, e)
        raise Reply(503, {"error": f"service unavailable: {type(e).__name__}"}) from None


def parse(model, body: bytes):
    """`model` validated from JSON bytes; a 422 Reply naming the field and the problem."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        for error in errors:  # located as FastAPI locates body fields (the other routes' 422s)
            error["loc"] = ("body", *error["loc"])
        raise Reply(422, validation_error(errors)) from None
