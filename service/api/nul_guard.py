"""Refuse NUL characters in the path and query string (422) before any route runs: no identifier or filter
contains one, and PostgreSQL text cannot store or compare one (it would be a 500, not a clear answer)."""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

from service.domain.errors import error_body


def has_nul(scope) -> bool:
    path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    return b"\x00" in unquote_to_bytes(path) or b"\x00" in unquote_to_bytes(scope.get("query_string", b""))


class NulGuardMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not has_nul(scope):
            return await self.app(scope, receive, send)
        message = "the URL path or query string contains a NUL character (%00)"
        body = json.dumps(error_body(message, "invalid_request_error", "nul_character")).encode()
        await send({"type": "http.response.start", "status": 422,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
