"""Deletion requests and their forget payloads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.domain.db.models import DeletionRequest, ForgetPayload, Job


def add_request(session: Session, request: DeletionRequest, forget: list[Any], retain: list[Any]) -> DeletionRequest:
    session.add(request)
    session.flush()
    session.add(ForgetPayload(request_id=request.id, forget=forget, retain=retain))
    session.flush()
    return request


def get_request(session: Session, request_id: str, tenant: str | None) -> DeletionRequest | None:
    """tenant=None: any tenant (admin). Another tenant's request is indistinguishable from a missing one."""
    request = session.get(DeletionRequest, request_id)
    if request is None or (tenant is not None and request.tenant != tenant):
        return None
    return request


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> DeletionRequest | None:
    return session.scalar(
        select(DeletionRequest).where(DeletionRequest.tenant == tenant, DeletionRequest.idempotency_key == key)
    )


def list_requests(
    session: Session,
    *,
    tenant: str | None,
    status: str | None = None,
    subject_ref: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    offset: int = 0,
    limit: int = 50,
) -> list[tuple[DeletionRequest, Job]]:
    query = select(DeletionRequest, Job).join(Job, (Job.request_id == DeletionRequest.id) & (Job.kind == "unlearn"))
    if tenant is not None:
        query = query.where(DeletionRequest.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if subject_ref is not None:
        query = query.where(DeletionRequest.subject_ref == subject_ref)
    if since is not None:
        query = query.where(DeletionRequest.created_at >= since)
    if until is not None:
        query = query.where(DeletionRequest.created_at < until)
    query = query.order_by(DeletionRequest.created_at.desc(), DeletionRequest.id).offset(offset).limit(limit)
    return [(r, j) for r, j in session.execute(query).all()]


def get_payload(session: Session, request_id: str) -> ForgetPayload | None:
    return session.get(ForgetPayload, request_id)


def purge_payload(session: Session, request_id: str) -> bool:
    """Delete the raw forget data. Returns whether there was anything to delete."""
    result = session.execute(delete(ForgetPayload).where(ForgetPayload.request_id == request_id))
    session.flush()
    return bool(result.rowcount)


def pending_payloads(session: Session) -> list[ForgetPayload]:
    """Payloads of requests whose job has not ended (the serving guard's source)."""
    query = (
        select(ForgetPayload)
        .join(Job, (Job.request_id == ForgetPayload.request_id) & (Job.kind == "unlearn"))
        .where(Job.status.in_(("queued", "running", "verifying")))
    )
    return list(session.scalars(query))
