"""Database rows -> response models."""

from __future__ import annotations

from service.api.schemas import DeletionRequestOut, JobOut, ProbesOut, Progress, Timings
from service.domain.db.models import DeletionRequest, Job, RequestProbe


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        request_id=job.request_id,
        kind=job.kind,
        status=job.status,  # type: ignore[arg-type]
        outcome=job.outcome,  # type: ignore[arg-type]
        stage=job.stage,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        progress=Progress(
            step=job.progress_step, total=job.progress_total, loss=job.progress_loss, eta_seconds=job.eta_seconds
        ),
        timings=Timings(
            created_at=job.created_at, started_at=job.started_at, trained_at=job.trained_at,
            finished_at=job.finished_at, updated_at=job.updated_at,
        ),
        error=job.error,
        model_version=job.model_version,
        metrics=job.metrics,
        verdict=job.verdict,
    )


def probes_out(probe: RequestProbe | None) -> ProbesOut | None:
    if probe is None:
        return None
    return ProbesOut(n_items=probe.n_items, sealed_at=probe.sealed_at, expires_at=probe.expires_at,
                     shredded_at=probe.shredded_at)


def request_out(request: DeletionRequest, job: Job, probe: RequestProbe | None = None,
                withdrawal: Job | None = None) -> DeletionRequestOut:
    return DeletionRequestOut(
        id=request.id,
        tenant=request.tenant,
        subject_ref=request.subject_ref,
        reason=request.reason,
        method=request.method,
        params=request.params,
        n_forget=request.n_forget,
        n_retain=request.n_retain,
        payload_digest=request.payload_digest,
        created_at=request.created_at,
        job=job_out(job),
        probes=probes_out(probe),
        withdrawal=job_out(withdrawal) if withdrawal is not None else None,
    )
