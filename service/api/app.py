"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.api.access_log import AccessLogMiddleware
from service.api.body_limit import BodyLimitMiddleware
from service.api.console import STATIC_DIR as CONSOLE_STATIC_DIR
from service.api.console import STATIC_URL as CONSOLE_STATIC_URL
from service.api.errors import install_error_handlers
from service.api.nul_guard import NulGuardMiddleware
from service.api.openapi_doc import ERROR_RESPONSES, install_openapi
from service.api.routers import (
    audit,
    chat,
    completions,
    console,
    deletion_requests,
    health,
    jobs,
    model_versions,
    models,
)
from service.api.serving import metrics as serving_metrics
from service.domain.audit.digest import load_or_create_hmac_key
from service.domain.broker import configured_redis_url
from service.domain.queue import make_celery
from service.domain.settings import ConfigError, Settings, check_data_dir, get_settings
from service.domain.sweeper import Sweeper

API_DESCRIPTION = """Takes data-deletion requests against a served language model, trains and fuses an
unlearning layer per request, verifies the result and keeps a tamper-evident audit trail.

Verification metrics are evidence of forgetting measured on the model's outputs (likelihood, extraction,
membership inference), not a mathematical proof that the data's influence is gone."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    sweeper = Sweeper(
        settings, app.state.celery, settings.sweep_interval_seconds, settings.requeue_queued_after_seconds
    )
    sweeper.start()
    if app.state.serving is not None:
        app.state.serving.start()  # loads the active version in its own thread; /readyz says when it is in
    try:
        yield
    finally:
        if app.state.serving is not None:
            app.state.serving.stop()
        sweeper.stop()


def serving_app() -> FastAPI:
    """The app of one of `unlearn serve --workers N`'s processes: settings from the environment."""
    from service.domain.logging import configure_logging

    configure_logging()
    return create_app(get_settings(), serve_model=True)


def create_app(settings: Settings | None = None, *, serve_model: bool = False) -> FastAPI:
    settings = settings or get_settings()
    check_data_dir(settings)
    app = FastAPI(title="Unlearning service", version="1.0", description=API_DESCRIPTION, lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.state.settings = settings
    app.state.hmac_key = load_or_create_hmac_key(settings.data_dir, settings.hmac_key)
    redis_url = configured_redis_url(settings)
    if redis_url is None:
        raise ConfigError("no broker: set UNLEARN_REDIS_URL, or use `unlearn serve` which embeds Redis")
    app.state.celery = make_celery(redis_url, settings)
    app.state.metrics = serving_metrics.ServingMetrics()
    app.state.serving = None
    if serve_model:
        from service.api.serving.holder import ModelHolder  # imports torch: only processes that serve a model

        app.state.serving = ModelHolder(settings, app.state.metrics)
    install_error_handlers(app)
    app.add_middleware(serving_metrics.HttpMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(NulGuardMiddleware)
    app.add_middleware(AccessLogMiddleware)  # outermost: every response, 413s included, carries a request id
    routers = [m.router for m in (health, deletion_requests, jobs, audit, model_versions, chat, completions, models,
                                  serving_metrics)]
    for router in routers:
        app.include_router(router)
    install_openapi(app, routers)
    app.include_router(console.router)  # the web console: HTML, not part of the OpenAPI document
    app.mount(CONSOLE_STATIC_URL, StaticFiles(directory=CONSOLE_STATIC_DIR), name="console-static")
    return app
