"""Business operations on deletion requests: submit (with limits and idempotency) and cancel. Functions here flush;
the caller commits, then enqueues (a job is never enqueued before the transaction that created it is durable)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain import job_states
from service.domain.audit.chain import canonical
from service.domain.audit.digest import item_digest, payload_digest
from service.domain.db.models import DeletionRequest, Job
from service.domain.db.session import write_lock
from service.domain.errors import Conflict, NotFound, PayloadTooLarge, TooManyRequests, Unprocessable
from service.domain.principal import Principal
from service.domain.repositories import audit, deletion_requests, jobs
from service.domain.settings import Settings
from service.domain.submission import DeletionRequestCreate


@dataclass
class Submitted:
    request: DeletionRequest
    job: Job
    created: bool  # False: an Idempotency-Key replay of an earlier submission


def check_limits(body: DeletionRequestCreate, settings: Settings) -> None:
    for field, items, limit, setting in (
        ("forget", body.forget, settings.max_forget_items, "UNLEARN_MAX_FORGET_ITEMS"),
        ("retain", body.retain, settings.max_retain_items, "UNLEARN_MAX_RETAIN_ITEMS"),
    ):
        if len(items) > limit:
            raise PayloadTooLarge(
                f"{field} has {len(items)} items; the limit is {limit} ({setting})",
                param=field, code="too_many_items", limit=limit,
            )
        for i, item in enumerate(items):
            if item.chars() > settings.max_item_chars:
                raise PayloadTooLarge(
                    f"{field}[{i}] has {item.chars()} characters; the limit is {settings.max_item_chars} per item"
                    " (UNLEARN_MAX_ITEM_CHARS)",
                    param=f"{field}.{i}", code="item_too_large", limit=settings.max_item_chars,
                )
    for i, item in enumerate(body.forget + body.retain):
        if any("\x00" in v for v in item.as_row().values()):
            raise Unprocessable(f"item {i} contains a NUL character", param="forget")


def body_hash(body: DeletionRequestCreate) -> str:
    return hashlib.sha256(canonical(body.model_dump(mode="json"))).hexdigest()


def submit(
    session: Session, settings: Settings, hmac_key: bytes, principal: Principal, body: DeletionRequestCreate,
    idempotency_key: str | None,
) -> Submitted:
    check_limits(body, settings)
    digest_of_body = body_hash(body)
    write_lock(session)
    if idempotency_key is not None:
        earlier = replay(session, principal.tenant, idempotency_key, digest_of_body)
        if earlier is not None:
            return earlier
    check_tenant_capacity(session, settings, principal.tenant, settings.max_active_jobs_per_tenant)
    forget_rows = [item.as_row() for item in body.forget]
    retain_rows = [item.as_row() for item in body.retain]
    params = body.params.model_dump(exclude_none=True) if body.params else {}
    request = DeletionRequest(
        tenant=principal.tenant,
        subject_ref=body.subject_ref,
        reason=body.reason,
        method=body.method or settings.method,
        params=params,
        n_forget=len(forget_rows),
        n_retain=len(retain_rows),
        payload_digest=payload_digest(hmac_key, forget_rows),
        idempotency_key=idempotency_key,
        body_hash=digest_of_body,
        created_by=principal.key_id,
    )
    try:
        with session.begin_nested():
            deletion_requests.add_request(session, request, forget_rows, retain_rows)
    except IntegrityError:
        # a concurrent submission with the same Idempotency-Key won the race
        earlier = replay(session, principal.tenant, idempotency_key or "", digest_of_body)
        if earlier is None:
            raise
        return earlier
    job = jobs.add_job(session, Job(request_id=request.id, tenant=principal.tenant, status="queued"))
    audit.append_event(
        session,
        "request.received",
        {
            "request_id": request.id,
            "job_id": job.id,
            "subject_ref": request.subject_ref,
            "reason": request.reason,
            "method": request.method,
            "params": params,
            "n_forget": request.n_forget,
            "n_retain": request.n_retain,
            "payload_digest": request.payload_digest,
            "item_digests": [item_digest(hmac_key, row) for row in forget_rows],
        },
        actor=principal.key_id,
        tenant=principal.tenant,
        request_id=request.id,
    )
    return Submitted(request=request, job=job, created=True)


def replay(session: Session, tenant: str, key: str, digest_of_body: str) -> Submitted | None:
    earlier = deletion_requests.find_by_idempotency_key(session, tenant, key)
    if earlier is None:
        return None
    if earlier.body_hash != digest_of_body:
        raise Unprocessable(
            "Idempotency-Key was already used with a different request body", param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    job = jobs.get_job_for_request(session, earlier.id)
    assert job is not None
    return Submitted(request=earlier, job=job, created=False)


def check_tenant_capacity(session: Session, settings: Settings, tenant: str, limit: int) -> None:
    if limit and jobs.count_active_for_tenant(session, tenant) >= limit:
        raise TooManyRequests(
            f"tenant has {limit} active jobs (queued, running or verifying); the limit is {limit}"
            " (UNLEARN_MAX_ACTIVE_JOBS_PER_TENANT)",
            code="too_many_active_jobs", headers={"Retry-After": "60"}, limit=limit,
        )


def cancel(session: Session, principal: Principal, job_id: str) -> Job:
    """Queued jobs end now; running ones are flagged and the worker stops at its next step."""
    write_lock(session)
    job = jobs.get_job(session, job_id, principal.tenant_scope)
    if job is None:
        raise NotFound(f"job {job_id} not found", param="job_id")
    if job.status in job_states.ENDED:
        raise Conflict(f"job {job_id} already ended with status '{job.status}'", code="job_ended")
    audit.append_event(
        session, "job.cancel_requested", {"job_id": job.id, "request_id": job.request_id, "status": job.status},
        actor=principal.key_id, tenant=job.tenant, request_id=job.request_id,
    )
    session.refresh(job)
    job.cancel_requested = True
    if job.status == "queued":
        job_states.end(session, job, "cancelled", actor=principal.key_id)
    session.flush()
    return job
