"""Celery tasks: thin glue. Each carries only the job id; the data is read from the database by id."""

from __future__ import annotations

import structlog
from celery import Task
from celery.signals import worker_process_init

from service.domain.logging import configure_logging
from service.domain.queue import FUSE_TASK, TRAIN_TASK, WITHDRAW_TASK
from workers.celery_app import app_from_env
from workers.context import WorkerContext, make_context
from workers.endings import end_job
from workers.progress import LeaseLost

app = app_from_env()
log = structlog.get_logger("unlearn.worker")
_context: WorkerContext | None = None


@worker_process_init.connect
def _init_child(**_kwargs) -> None:
    configure_logging()


def context() -> WorkerContext:
    global _context
    if _context is None:
        _context = make_context(app)
    return _context


def _guarded(step, job_id: str) -> str:
    """Unexpected errors end the job `failed` with the reason (never a silent retry loop)."""
    ctx = context()
    try:
        return step(ctx, job_id)
    except LeaseLost:
        log.warning("job.lease_lost", job_id=job_id)
        return "skipped"
    except Exception as exc:
        log.exception("job.error", job_id=job_id)
        end_job(ctx, job_id, "failed", reason=f"internal error: {type(exc).__name__}: {exc}", only_if_owned=True)
        return "failed"
    finally:
        _checkpoint_if_due(ctx)


def _checkpoint_if_due(ctx: WorkerContext) -> None:
    """Sign the audit chain's head every UNLEARN_AUDIT_CHECKPOINT_EVERY events."""
    from service.domain.audit.service import maybe_checkpoint

    try:
        with ctx.session() as session:
            if maybe_checkpoint(session, ctx.settings.data_dir, ctx.settings.audit_checkpoint_every):
                session.commit()
    except Exception:
        log.warning("audit.checkpoint_failed", exc_info=True)


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def train(self: Task, job_id: str) -> str:
    from workers.training import run_training

    return _guarded(run_training, job_id)


@app.task(name=FUSE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def fuse(self: Task, job_id: str) -> str:
    from workers.fusion_step import run_fusion

    return _guarded(run_fusion, job_id)


@app.task(name=WITHDRAW_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def withdraw(self: Task, job_id: str) -> str:
    from workers.withdrawal_step import run_withdrawal

    return _guarded(run_withdrawal, job_id)
