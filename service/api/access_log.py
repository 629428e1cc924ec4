"""Access log: one `http.request` event per request with method, path (no query string: it may hold a
subject reference), status, duration, the caller's key id (never the key) and a request id. The request id
is the client's `X-Request-ID` when it is a plain token, else a fresh one; it is echoed in the response and
bound to every log event of the request (structlog contextvars).
"""

from __future__ import annotations

import re
import time
import uuid

import structlog

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    given = dict(headers).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class AccessLogMiddleware:
    """Pure ASGI (streams pass through untouched): request id in, request id out, one log line."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope["headers"])
        started = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                principal = scope.get("state", {}).get("principal")
                structlog.get_logger("unlearn.access").info(
                    "http.request", method=scope["method"], path=scope["path"], status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                    key_id=getattr(principal, "key_id", None),
                )
