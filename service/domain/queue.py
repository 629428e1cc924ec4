"""The task queue's shape, shared by the API (which enqueues) and the workers (which consume): task and
queue names, the Celery client configuration, and enqueueing by task name, carrying only the job id (never
the forget data). Imports no task code and no torch.

Reliability settings (see DESIGN.md section 3):
- acks_late + task_reject_on_worker_lost: a task whose worker dies is redelivered, not lost;
- worker_prefetch_multiplier=1: a busy worker does not hoard queued jobs;
- visibility_timeout above the longest job: Redis does not redeliver a job that is still running;
- the job lease in the database (compare-and-set) makes any redelivery of a finished or taken job a no-op.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.domain.settings import Settings

TRAIN_TASK = "unlearn.train"
FUSE_TASK = "unlearn.fuse"
WITHDRAW_TASK = "unlearn.withdraw"  # on the fusion queue: serialised with fusion
GPU_QUEUE = "gpu"
FUSION_QUEUE = "fusion"


def enqueue_training(celery: Celery, job_id: str) -> None:
    celery.send_task(TRAIN_TASK, args=[job_id], queue=GPU_QUEUE)


def enqueue_fusion(celery: Celery, job_id: str) -> None:
    celery.send_task(FUSE_TASK, args=[job_id], queue=FUSION_QUEUE)


def enqueue_withdrawal(celery: Celery, job_id: str) -> None:
    celery.send_task(WITHDRAW_TASK, args=[job_id], queue=FUSION_QUEUE)


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
        task_routes={TRAIN_TASK: {"queue": GPU_QUEUE}, FUSE_TASK: {"queue": FUSION_QUEUE},
                     WITHDRAW_TASK: {"queue": FUSION_QUEUE}},
        task_default_queue=GPU_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
