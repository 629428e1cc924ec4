"""Task step 1 (any GPU worker, in parallel): lease the job, train this request's unlearning layer against
the frozen base model, stage it, hand over to the single fusion consumer."""

from __future__ import annotations

import structlog

from service import lifecycle
from service.db.models import utcnow
from service.queue import enqueue_fusion
from service.db.session import write_lock
from service.repositories import audit, deletion_requests, jobs
from workers.context import WorkerContext
from workers.progress import JobProgress, LeaseHeartbeat
from workers.settings_map import layer_config, train_config

log = structlog.get_logger("unlearn.worker")


def run_training(ctx: WorkerContext, job_id: str) -> str:
    """Returns what happened, for logs and tests: 'staged', 'skipped', 'cancelled', 'failed'."""
    with ctx.session() as session:
        outcome = _lease_for_training(ctx, session, job_id)
        if outcome != "leased":
            session.commit()
            return outcome
        job = jobs.get_job(session, job_id)
        request = deletion_requests.get_request(session, job.request_id, None)
        payload = deletion_requests.get_payload(session, job.request_id)
        audit.append_event(
            session, "job.started", {"job_id": job.id, "request_id": job.request_id, "attempt": job.attempts},
            tenant=job.tenant, request_id=job.request_id,
        )
        session.commit()
        if payload is None:
            return _fail(ctx, job_id, "the forget payload is gone (purged before training); resubmit the request")
        tenant, request_id = job.tenant, job.request_id
        forget_rows, retain_rows = list(payload.forget), list(payload.retain)
        method, params = request.method, dict(request.params)

    from workers.engine.data import parse_examples
    from workers.engine.retain import build_retain
    from workers.engine.trainer import Cancelled
    from workers.engine.unlearn import train_request, trained_tensors

    progress = JobProgress(ctx, job_id, tenant, request_id)
    try:
        with LeaseHeartbeat(ctx, job_id):  # loading the model and the retain set report no progress
            base = ctx.base
            forget = parse_examples(forget_rows)
            retain = build_retain(
                parse_examples(retain_rows), ctx.settings.retain_corpus, base.model, base.tokenizer,
                ctx.settings.models_dir / "retain-cache", model_key=base.source_sha256,
            )
            trained = train_request(
                base, forget, retain, layer_config(ctx.settings, params), train_config(ctx.settings, method, params),
                on_progress=progress.on_progress, should_stop=progress.should_stop,
            )
    except Cancelled:
        return _end_cancelled(ctx, job_id)
    tensors, meta = trained_tensors(trained)
    ctx.store.stage(job_id, tensors, meta)
    with ctx.session() as session:
        if not jobs.release_lease(session, job_id, ctx.owner, stage="trained", trained_at=utcnow()):
            session.rollback()
            return "skipped"
        session.commit()
    enqueue_fusion(ctx.celery, job_id)
    log.info("job.trained", job_id=job_id, seconds=round(trained.seconds, 2))
    return "staged"


def _lease_for_training(ctx: WorkerContext, session, job_id: str) -> str:  # noqa: ANN001
    write_lock(session)
    job = jobs.get_job(session, job_id)
    if job is None:
        log.warning("job.unknown", job_id=job_id)
        return "skipped"
    if job.status == "running" and job.stage == "trained":
        # trained earlier but the fusion message was lost: hand over again, no retraining
        enqueue_fusion(ctx.celery, job_id)
        return "skipped"
    if job.cancel_requested and job.status not in jobs.ENDED:
        lifecycle.end_cancelled(session, job, actor=None)
        return "cancelled"
    won = jobs.try_lease(
        session, job_id, owner=ctx.owner, from_statuses=("queued", "running"), stages=None, to_status="running",
        to_stage="training", lease_seconds=ctx.settings.job_lease_seconds, max_attempts=ctx.settings.job_max_attempts,
        count_attempt=True,
    )
    if won:
        job = jobs.get_job(session, job_id)
        job.started_at = job.started_at or utcnow()
        return "leased"
    job = jobs.get_job(session, job_id)
    if job.status in ("queued", "running") and job.attempts >= ctx.settings.job_max_attempts and _lease_expired(job):
        _fail_in_session(session, job, f"gave up after {job.attempts} attempts (worker lost each time)")
        return "failed"
    log.info("job.not_leased", job_id=job_id, status=job.status)  # redelivery of a taken or ended job: no-op
    return "skipped"


def _lease_expired(job) -> bool:  # noqa: ANN001
    return job.lease_expires_at is None or job.lease_expires_at.replace(tzinfo=job.lease_expires_at.tzinfo or utcnow().tzinfo) < utcnow()


def _fail_in_session(session, job, reason: str) -> None:  # noqa: ANN001
    job.status, job.error, job.finished_at, job.lease_owner = "failed", reason, utcnow(), None
    audit.append_event(
        session, "job.failed", {"job_id": job.id, "request_id": job.request_id, "reason": reason},
        tenant=job.tenant, request_id=job.request_id,
    )
    lifecycle.purge(session, job, actor=None)


def _fail(ctx: WorkerContext, job_id: str, reason: str) -> str:
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        _fail_in_session(session, job, reason)
        session.commit()
    ctx.store.discard_staged(job_id)
    return "failed"


def _end_cancelled(ctx: WorkerContext, job_id: str) -> str:
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job.status not in jobs.ENDED:
            lifecycle.end_cancelled(session, job, actor=None)
        session.commit()
    ctx.store.discard_staged(job_id)
    return "cancelled"


def _fail_if_owned(ctx: WorkerContext, job_id: str, reason: str) -> None:
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job is None or job.status in jobs.ENDED or job.lease_owner != ctx.owner:
            session.rollback()
            return
        _fail_in_session(session, job, reason)
        session.commit()
    ctx.store.discard_staged(job_id)
