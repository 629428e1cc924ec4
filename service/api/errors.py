"""Every error leaves the HTTP layer as one JSON shape (see service.domain.errors for the shape)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.domain.errors import ServiceError, error_body


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def validation_error_items(errors: Any) -> list[dict[str, Any]]:
    """pydantic/FastAPI validation errors as the API names them: {param, message, limit?} each."""
    items = []
    for err in errors:
        item = {"param": _loc_to_param(tuple(err.get("loc", ()))), "message": err.get("msg", "invalid")}
        ctx = err.get("ctx") or {}
        limits = {
            k: v for k, v in ctx.items() if k in ("max_length", "min_length", "le", "ge", "lt", "gt", "limit_value")
        }
        if limits:
            item["limit"] = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in limits.items()}
        items.append(item)
    return items


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = validation_error_items(exc.errors())
    first = errors[0] if errors else {"param": None, "message": "invalid request"}
    message = "; ".join(f"{e['param']}: {e['message']}" for e in errors[:5])
    body = error_body(message, "invalid_request_error", "validation_error", first["param"], errors=errors)
    return JSONResponse(body, status_code=422)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI's "error parsing the body": name the real cause, same status as other unparseable JSON
        message = f"request body is not valid UTF-8 (byte {exc.__cause__.start}): send JSON encoded as UTF-8"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_utf8", "body"), status_code=422)
    codes = {
        401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"
    }
    body = error_body(str(exc.detail), "invalid_request_error", codes.get(exc.status_code, "http_error"))
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
