"""The Celery application. Imports no torch: the API process uses it to enqueue by task name.

Reliability settings (see DESIGN.md section 3):
- acks_late + task_reject_on_worker_lost: a task whose worker dies is redelivered, not lost;
- worker_prefetch_multiplier=1: a busy worker does not hoard queued jobs;
- visibility_timeout above the longest job: Redis does not redeliver a job that is still running;
- the job lease in the database (compare-and-set) makes any redelivery of a finished or taken job a no-op.
Pool: prefork with -c 1 and --max-tasks-per-child=1, so each job runs in a fresh child process that touches
CUDA only inside the task and returns all GPU memory when it exits (solo would answer no pings while busy).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.queue import FUSE_TASK, FUSION_QUEUE, GPU_QUEUE, TRAIN_TASK
from service.settings import Settings


def make_celery(redis_url: str, settings: Settings) -> Celery:
    app = Celery("unlearn", broker=redis_url, include=[])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(GPU_QUEUE), Queue(FUSION_QUEUE)],
        task_routes={TRAIN_TASK: {"queue": GPU_QUEUE}, FUSE_TASK: {"queue": FUSION_QUEUE}},
        task_default_queue=GPU_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def app_from_env() -> Celery:
    """The worker's app: settings from the environment; tasks registered from workers.tasks."""
    from service.broker import configured_redis_url
    from service.settings import get_settings

    settings = get_settings()
    url = configured_redis_url(settings)
    if url is None:
        raise RuntimeError("no broker: set UNLEARN_REDIS_URL or start `unlearn serve` (embedded Redis) first")
    app = make_celery(url, settings)
    app.conf.include = ["workers.tasks"]
    return app
