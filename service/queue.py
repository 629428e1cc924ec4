"""Enqueueing from the API process: by task name, carrying only the job id (never the forget data)."""

from __future__ import annotations

from celery import Celery

TRAIN_TASK = "unlearn.train"
FUSE_TASK = "unlearn.fuse"
GPU_QUEUE = "gpu"
FUSION_QUEUE = "fusion"


def enqueue_training(celery: Celery, job_id: str) -> None:
    celery.send_task(TRAIN_TASK, args=[job_id], queue=GPU_QUEUE)


def enqueue_fusion(celery: Celery, job_id: str) -> None:
    celery.send_task(FUSE_TASK, args=[job_id], queue=FUSION_QUEUE)
