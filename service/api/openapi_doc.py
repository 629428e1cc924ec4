"""The OpenAPI document tells the truth about errors and auth: every operation declares the error shape it
can answer with (service/errors.py), and every operation that needs a key declares HTTP bearer security."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict

SECURITY_SCHEME = "bearerAuth"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # details: limit, errors[], ...

    message: str
    type: str
    code: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_STATUSES = {
    400: "Bad request (e.g. the prompt does not fit the model's context)",
    401: "Missing, unknown or revoked API key",
    403: "The key's role may not do this",
    404: "Not found, or owned by another tenant",
    409: "Conflict with the resource's state",
    413: "Body, item count or item length over the limit",
    422: "Invalid request (schema, JSON or encoding)",
    429: "Rate limit or tenant job cap reached (see Retry-After)",
    503: "Not ready (model loading, not served by this process)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in ERROR_STATUSES.items()
}


def needs_key(route: APIRoute) -> bool:
    from service.api.deps import get_principal

    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if dependant.call is get_principal:
            return True
        pending.extend(dependant.dependencies)
    return False


def install_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """`routers`: those included in the app (their routes carry the full path)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>` (`unlearn keys create`)",
        }
        for route in (r for router in routers for r in router.routes):
            if isinstance(route, APIRoute) and route.include_in_schema and needs_key(route):
                for method in route.methods:
                    schema["paths"][route.path_format][method.lower()]["security"] = [{SECURITY_SCHEME: []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
