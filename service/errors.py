"""Business errors carry their own status code; every error leaves as one JSON shape.

Shape (OpenAI-compatible, so the `openai` SDK surfaces it too):
    {"error": {"message": str, "type": str, "code": str, "param": str | null, ...details}}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ServiceError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code = "bad_request"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None, **details: Any,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers
        self.details = details

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param, **self.details)


class Unauthorized(ServiceError):
    status_code, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ServiceError):
    status_code, type, code = 403, "permission_error", "forbidden"


class NotFound(ServiceError):
    status_code, type, code = 404, "not_found_error", "not_found"


class Conflict(ServiceError):
    status_code, type, code = 409, "conflict_error", "conflict"


class PayloadTooLarge(ServiceError):
    status_code, type, code = 413, "invalid_request_error", "payload_too_large"


class Unprocessable(ServiceError):
    status_code, type, code = 422, "invalid_request_error", "unprocessable"


class TooManyRequests(ServiceError):
    status_code, type, code = 429, "rate_limit_error", "rate_limited"


class Unavailable(ServiceError):
    status_code, type, code = 503, "service_unavailable", "unavailable"


def error_body(message: str, type_: str, code: str, param: str | None = None, **details: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param, **details}}


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        item = {"param": _loc_to_param(tuple(err.get("loc", ()))), "message": err.get("msg", "invalid")}
        ctx = err.get("ctx") or {}
        limits = {k: v for k, v in ctx.items() if k in ("max_length", "min_length", "le", "ge", "lt", "gt", "limit_value")}
        if limits:
            item["limit"] = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in limits.items()}
        errors.append(item)
    first = errors[0] if errors else {"param": None, "message": "invalid request"}
    message = "; ".join(f"{e['param']}: {e['message']}" for e in errors[:5])
    body = error_body(message, "invalid_request_error", "validation_error", first["param"], errors=errors)
    return JSONResponse(body, status_code=422)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI's "error parsing the body": name the real cause, same status as other unparseable JSON
        message = f"request body is not valid UTF-8 (byte {exc.__cause__.start}): send JSON encoded as UTF-8"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_utf8", "body"), status_code=422)
    codes = {401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    body = error_body(str(exc.detail), "invalid_request_error", codes.get(exc.status_code, "http_error"))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
