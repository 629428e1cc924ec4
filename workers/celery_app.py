"""The worker's Celery application: the shared client configuration (service.domain.queue) plus the task
modules. Pool: prefork with -c 1 and --max-tasks-per-child=1, so each job runs in a fresh child process
that touches CUDA only inside the task and returns all GPU memory when it exits (solo would answer no pings
while busy)."""

from __future__ import annotations

from celery import Celery

from service.domain.broker import configured_redis_url
from service.domain.queue import make_celery
from service.domain.settings import get_settings


def app_from_env() -> Celery:
    """The worker's app: settings from the environment; tasks registered from workers.tasks."""
    settings = get_settings()
    url = configured_redis_url(settings)
    if url is None:
        raise RuntimeError("no broker: set UNLEARN_REDIS_URL or start `unlearn serve` (embedded Redis) first")
    app = make_celery(url, settings)
    app.conf.include = ["workers.tasks"]
    return app
