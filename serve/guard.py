"""Request body limit, as an ASGI wrapper: uvicorn itself has no limit on body size.

A declared Content-Length over the limit is refused with 413 before the body is read; a chunked
body is counted as it arrives and refused as soon as it passes the limit (the handler's body
parsing then fails with a 4xx), so a client can never make the server buffer more than the limit.
"""

from __future__ import annotations

import orjson


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_big = False  # uvicorn refuses a malformed Content-Length before it gets here
        if too_big:
            return await self._refuse(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send) -> None:
        body = orjson.dumps({"error": f"request body over the limit of {self.max_bytes} bytes"})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
