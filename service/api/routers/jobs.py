"""GET /v1/jobs/{id} and POST /v1/jobs/{id}/cancel."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import ReaderDep, RequesterDep, SessionDep
from service.api.schemas import JobOut
from service.api.views import job_out
from service.domain import deletions
from service.domain.errors import NotFound
from service.domain.repositories import jobs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, principal: ReaderDep) -> JobOut:
    """Status, progress (step/total/loss/eta), timings, metrics and verdict, and the model version it produced.

    Metrics are evidence of forgetting measured on model outputs, not a proof of erasure."""
    job = jobs.get_job(session, job_id, principal.tenant_scope)
    if job is None:
        raise NotFound(f"job {job_id} not found", param="job_id")
    return job_out(job)


@router.post("/{job_id}/cancel", response_model=JobOut, status_code=202)
def cancel_job(job_id: str, session: SessionDep, principal: RequesterDep) -> JobOut:
    """Cancel a queued (ends now) or running job (stops at its next training step, publishes nothing)."""
    job = deletions.cancel(session, principal, job_id)
    session.commit()
    return job_out(job)
