"""Request body cap (413) as a pure ASGI middleware, so a chunked upload (no Content-Length) is cut off
after `limit + 1` bytes instead of being read into memory whole."""

from __future__ import annotations

import json

from service.domain.errors import error_body

BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class BodyLimitMiddleware:
    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._refuse(send, f"request body is {length.decode('latin-1')} bytes")
            return await self.app(scope, receive, send)
        if scope["method"].encode() not in BODY_METHODS:
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:  # chunked: buffer at most limit + one chunk, then replay it downstream
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(send, "request body (chunked) is over the limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, what: str) -> None:
        message = f"{what}; the limit is {self.limit} bytes (UNLEARN_MAX_BODY_BYTES)"
        body = json.dumps(error_body(message, "invalid_request_error", "payload_too_large", limit=self.limit)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
