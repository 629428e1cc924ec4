"""Business errors carry their own status code; every error leaves as one JSON shape.

Shape (OpenAI-compatible, so the `openai` SDK surfaces it too):
    {"error": {"message": str, "type": str, "code": str, "param": str | null, ...details}}
"""

from __future__ import annotations

from typing import Any


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
