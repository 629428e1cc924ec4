"""POST/GET /v1/deletion-requests: the privacy officer's entry point."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query, Request, Response

from service.api.deps import AdminDep, ReaderDep, SessionDep, SettingsDep, SubmitterDep
from service.api.schemas import DeletionRequestOut, DeletionRequestPage, JobOut, WithdrawalCreate
from service.api.views import job_out, request_out
from service.domain import deletions, withdrawals
from service.domain.errors import NotFound
from service.domain.job_states import JobStatus
from service.domain.queue import enqueue_training, enqueue_withdrawal
from service.domain.repositories import deletion_requests, jobs, probes
from service.domain.submission import DeletionRequestCreate

log = structlog.get_logger("unlearn.api")
router = APIRouter(prefix="/v1/deletion-requests", tags=["deletion-requests"])

# query parameter types, shared with the console's pages so both paginate within the same bounds
PageOffset = Annotated[int, Query(ge=0, le=1_000_000)]
PageLimit = Annotated[int, Query(ge=1, le=200)]


@router.post("", status_code=202, response_model=DeletionRequestOut)
def create_deletion_request(
    body: DeletionRequestCreate, request: Request, response: Response, session: SessionDep, settings: SettingsDep,
    principal: SubmitterDep, idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> DeletionRequestOut:
    """Submit data to forget. Answers 202 with the queued job; poll `Location` (GET /v1/jobs/{id}).

    Same `Idempotency-Key` + same body returns the first answer; same key + another body is a 422."""
    submitted = deletions.submit(session, settings, request.app.state.hmac_key, principal, body, idempotency_key)
    if submitted.created:
        session.commit()
        try:
            enqueue_training(request.app.state.celery, submitted.job.id)
        except Exception as exc:  # noqa: BLE001  (durable in the db: the sweeper enqueues it later)
            log.warning("enqueue.failed", job_id=submitted.job.id, error=type(exc).__name__)
    response.headers["Location"] = f"/v1/jobs/{submitted.job.id}"
    return request_out(submitted.request, submitted.job)


@router.get("", response_model=DeletionRequestPage)
def list_deletion_requests(
    session: SessionDep, settings: SettingsDep, principal: ReaderDep,
    status: JobStatus | None = None, subject_ref: Annotated[str | None, Query(max_length=200)] = None,
    since: datetime | None = None, until: datetime | None = None,
    offset: PageOffset = 0, limit: PageLimit = 50,
) -> DeletionRequestPage:
    rows = deletion_requests.list_requests(
        session, tenant=principal.tenant_scope, status=status, subject_ref=subject_ref, since=since, until=until,
        offset=offset, limit=limit + 1,
    )
    ids = [r.id for r, _ in rows[:limit]]
    sealed, withdrawn = probes.probes_for(session, ids), jobs.withdrawal_jobs(session, ids)
    page = [request_out(r, j, sealed.get(r.id), withdrawn.get(r.id)) for r, j in rows[:limit]]
    return DeletionRequestPage(
        data=page, offset=offset, limit=limit, next_offset=offset + limit if len(rows) > limit else None
    )


@router.get("/{request_id}", response_model=DeletionRequestOut)
def get_deletion_request(request_id: str, session: SessionDep, principal: ReaderDep) -> DeletionRequestOut:
    found = deletion_requests.get_request(session, request_id, principal.tenant_scope)
    job = jobs.get_job_for_request(session, request_id) if found else None
    if found is None or job is None:
        raise NotFound(f"deletion request {request_id} not found", param="request_id")
    return request_out(found, job, probes.get_probe(session, request_id),
                       jobs.get_job_for_request(session, request_id, "withdraw"))


@router.post("/{request_id}/withdraw", status_code=202, response_model=JobOut)
def withdraw_deletion_request(
    request_id: str, body: WithdrawalCreate, request: Request, response: Response, session: SessionDep,
    principal: AdminDep,
) -> JobOut:
    """Take a forgotten request out of the served model (a wrongful or duplicate request): a withdrawal job
    publishes a new version without its unlearning, every other request kept and re-checked. Admin only,
    reason required and audited; possible while the request's probes are kept (409 otherwise)."""
    job = withdrawals.request_withdrawal(session, principal, request_id, body.reason)
    session.commit()
    try:
        enqueue_withdrawal(request.app.state.celery, job.id)
    except Exception as exc:  # noqa: BLE001  (durable in the db: the sweeper enqueues it later)
        log.warning("enqueue.failed", job_id=job.id, error=type(exc).__name__)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job)
