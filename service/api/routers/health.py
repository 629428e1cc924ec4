"""Liveness and readiness. Ready = database answers, broker answers, and (when this process serves a model)
the model is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.domain.broker import check_redis, configured_redis_url
from service.domain.db.session import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        ping(settings.db_url)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"error: {type(exc).__name__}"
    url = configured_redis_url(settings)
    try:
        if url is None:
            raise RuntimeError("no broker configured")
        check_redis(url)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"error: {type(exc).__name__}"
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        checks["model"] = "not served by this process"
    else:
        checks["model"] = "ok" if serving.ready else "loading"
    ready = all(v == "ok" or v.startswith("not served") for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )
