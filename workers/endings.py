"""How a task ends a job: in its own transaction, through the one state machine (service.domain.job_states),
then drop the staged layer. A job that already ended, or that another worker owns, is left alone."""

from __future__ import annotations

from typing import Any, Literal

import structlog
from sqlalchemy.orm import Session

from service.domain import job_states
from service.domain.db.models import Job, utcnow
from service.domain.db.session import write_lock
from service.domain.repositories import jobs
from workers.context import WorkerContext

log = structlog.get_logger("unlearn.worker")


def end_job(
    ctx: WorkerContext, job_id: str, status: Literal["succeeded", "failed", "cancelled"], *,
    reason: str | None = None, only_if_owned: bool = False, **evidence: Any,
) -> str:
    """Returns `status` when this call ended the job, 'skipped' when it was not ours to end."""
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job is None or job.status in job_states.ENDED or (only_if_owned and job.lease_owner != ctx.owner):
            session.rollback()
            return "skipped"
        job_states.end(session, job, status, reason=reason, **evidence)
        session.commit()
    ctx.store.discard_staged(job_id)
    log.info(f"job.{status}", job_id=job_id)
    return status


def fail(ctx: WorkerContext, job_id: str, reason: str, **evidence: Any) -> str:
    return end_job(ctx, job_id, "failed", reason=reason, **evidence)


def not_memorized(ctx: WorkerContext, job_id: str, report: dict[str, Any]) -> str:
    """Nothing to unlearn: the model did not reproduce the items. Succeeded, no new version, the evidence kept."""
    return end_job(ctx, job_id, "succeeded", outcome="not_memorized", metrics={"memorization": report},
                   stage="checked", only_if_owned=True)


def cancel(ctx: WorkerContext, job_id: str) -> str:
    end_job(ctx, job_id, "cancelled")
    return "cancelled"


def give_up_if_exhausted(session: Session, job: Job, max_attempts: int) -> bool:
    """End a job that lost its worker `max_attempts` times `failed` (flushes; the caller commits)."""
    if job.status in ("queued", "running") and job.attempts >= max_attempts and _lease_expired(job):
        job_states.end(session, job, "failed", reason=f"gave up after {job.attempts} attempts (worker lost each time)")
        return True
    return False


def _lease_expired(job: Job) -> bool:
    expires = job.lease_expires_at
    if expires is None:
        return True
    return expires.replace(tzinfo=expires.tzinfo or utcnow().tzinfo) < utcnow()  # SQLite returns naive UTC
