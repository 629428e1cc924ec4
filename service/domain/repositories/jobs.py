"""Jobs: the lease (compare-and-set) that makes a redelivered task a no-op, progress, and endings."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from service.domain.db.models import Job, utcnow
from service.domain.job_states import ACTIVE, check_transition


def add_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str, tenant: str | None = None) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


def get_job_for_request(session: Session, request_id: str, kind: str = "unlearn") -> Job | None:
    """The request's own job (kind "unlearn"), or its latest withdrawal job (kind "withdraw")."""
    query = select(Job).where(Job.request_id == request_id, Job.kind == kind)
    return session.scalars(query.order_by(Job.created_at.desc()).limit(1)).first()


def withdrawal_jobs(session: Session, request_ids: list[str]) -> dict[str, Job]:
    """The latest withdrawal job of each of these requests that has one."""
    if not request_ids:
        return {}
    query = select(Job).where(Job.request_id.in_(request_ids), Job.kind == "withdraw").order_by(Job.created_at)
    return {job.request_id: job for job in session.scalars(query)}


def try_lease(
    session: Session, job_id: str, *, owner: str, from_statuses: tuple[str, ...], stages: tuple[str, ...] | None,
    to_status: str, to_stage: str, lease_seconds: int, max_attempts: int, count_attempt: bool,
) -> bool:
    """Compare-and-set: take the job if it is in one of `from_statuses` (and, when running, its previous
    lease expired). Exactly one of two racing workers gets True."""
    for status in from_statuses:
        check_transition(status, to_status)
    now = utcnow()
    values: dict[str, Any] = {
        "status": to_status,
        "stage": to_stage,
        "lease_owner": owner,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "updated_at": now,
    }
    if count_attempt:
        values["attempts"] = Job.attempts + 1
    free = or_(Job.status == "queued", Job.lease_expires_at.is_(None), Job.lease_expires_at < now)
    query = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(from_statuses), free, Job.cancel_requested.is_(False))
        .where(Job.attempts < max_attempts if count_attempt else True)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if stages is not None:
        query = query.where(Job.stage.in_(stages))
    won = session.execute(query).rowcount == 1
    session.expire_all()
    return won


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int, **progress: Any) -> bool:
    """Extend our lease (and write progress); False if we no longer own the job."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(("running", "verifying")))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now, **progress)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_lease(session: Session, job_id: str, owner: str, **values: Any) -> bool:
    """Hand the job over (e.g. trained -> fusion queue): clear our lease so the next step can take it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def is_cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def expired_jobs(session: Session, now: datetime | None = None, queued_older_than: datetime | None = None) -> list[Job]:
    """Jobs a sweeper should re-enqueue: running/verifying with an expired lease, long-queued ones, and
    trained ones handed over to fusion (lease released) whose fusion message has waited as long."""
    now = now or utcnow()
    stale_running = Job.status.in_(("running", "verifying")) & (Job.lease_expires_at < now)
    conditions = [stale_running]
    if queued_older_than is not None:
        conditions.append((Job.status == "queued") & (Job.updated_at < queued_older_than))
        handed_over = Job.status.in_(("running", "verifying")) & Job.lease_expires_at.is_(None)
        conditions.append(handed_over & (Job.updated_at < queued_older_than))
    return list(session.scalars(select(Job).where(or_(*conditions))))


def count_active_for_tenant(session: Session, tenant: str) -> int:
    return len(list(session.scalars(select(Job.id).where(Job.tenant == tenant, Job.status.in_(ACTIVE)))))
