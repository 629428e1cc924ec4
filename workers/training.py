"""Task step 1 (any GPU worker, in parallel): lease the job, train this request's unlearning layer against
the frozen base model, stage it, hand over to the single fusion consumer."""

from __future__ import annotations

import structlog

from service.domain import job_states
from service.domain.db.models import utcnow
from service.domain.db.session import write_lock
from service.domain.queue import enqueue_fusion
from service.domain.repositories import audit, deletion_requests, jobs, model_versions
from workers.context import WorkerContext
from workers.endings import cancel, fail, give_up_if_exhausted, not_memorized
from workers.progress import JobProgress, LeaseHeartbeat, LeaseLost
from workers.settings_map import layer_config, train_config

log = structlog.get_logger("unlearn.worker")


def run_training(ctx: WorkerContext, job_id: str) -> str:
    """Returns what happened, for logs and tests: 'staged', 'succeeded' (not memorised: nothing to train),
    'skipped', 'cancelled', 'failed'."""
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
            return fail(ctx, job_id, "the forget payload is gone (purged before training); resubmit the request")
        tenant, request_id = job.tenant, job.request_id
        forget_rows, retain_rows = list(payload.forget), list(payload.retain)
        method, params = request.method, dict(request.params)
        lineage = model_versions.get_version(session, model_versions.active_version(session))
        active = None if lineage is None else (lineage.version, lineage.manifest_sha256)  # what we fuse onto

    from workers.engine.data import parse_examples
    from workers.engine.retain import build_retain
    from workers.engine.trainer import Cancelled
    from workers.engine.unlearn import train_request, trained_tensors

    progress = JobProgress(ctx, job_id, tenant, request_id)
    try:
        with LeaseHeartbeat(ctx, job_id):  # loading the model and the retain set report no progress
            base = ctx.base
            forget = parse_examples(forget_rows)
            report = _memorization_report(ctx, active, forget)
            if not report["memorized"] and not ctx.settings.train_unmemorized:
                return not_memorized(ctx, job_id, report)
            neighbourhood = ctx.neighbourhood(forget)
            _record_metrics(ctx, job_id, {"memorization": report, "neighbourhood": neighbourhood.summary()})
            retain = build_retain(
                parse_examples(retain_rows), ctx.settings.retain_corpus, base.model, base.tokenizer,
                ctx.answer_cache_dir, model_key=base.source_sha256, neighbours=neighbourhood.train,
            )
            trained = train_request(
                base, forget, retain, layer_config(ctx.settings, params), train_config(ctx.settings, method, params),
                on_progress=progress.on_progress, should_stop=progress.should_stop,
            )
    except Cancelled:
        return cancel(ctx, job_id)
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


def _memorization_report(ctx: WorkerContext, active: tuple[int, str] | None, forget: list) -> dict:
    """Does the model this request would change (version, manifest sha256; None = the base) reproduce its
    items? The evidence for the job's outcome."""
    from workers.engine.verify.memorization import memorization_report
    from workers.engine.verify.scoring import to_eval_items
    from workers.engine.versions import build_serving_model, load_version

    base = ctx.base
    model = base.model
    if active is not None:
        stored = load_version(ctx.store, active[0], base.source_sha256, active[1])
        model = build_serving_model(base.model, stored.layer, stored.fused_maps)
    report = memorization_report(model, base.tokenizer, to_eval_items(forget))
    report["model_version"] = 0 if active is None else active[0]
    return report


def _record_metrics(ctx: WorkerContext, job_id: str, metrics: dict) -> None:
    with ctx.session() as session:
        if not jobs.renew_lease(session, job_id, ctx.owner, ctx.settings.job_lease_seconds, metrics=metrics):
            session.rollback()
            raise LeaseLost(job_id)
        session.commit()


def _lease_for_training(ctx: WorkerContext, session, job_id: str) -> str:
    write_lock(session)
    job = jobs.get_job(session, job_id)
    if job is None or job.kind != "unlearn":
        log.warning("job.unknown", job_id=job_id)
        return "skipped"
    if job.status == "running" and job.stage == "trained":
        # trained earlier but the fusion message was lost: hand over again, no retraining
        enqueue_fusion(ctx.celery, job_id)
        return "skipped"
    if job.cancel_requested and job.status not in job_states.ENDED:
        job_states.end(session, job, "cancelled")
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
    if give_up_if_exhausted(session, jobs.get_job(session, job_id), ctx.settings.job_max_attempts):
        return "failed"
    log.info("job.not_leased", job_id=job_id, status=job.status)  # redelivery of a taken or ended job: no-op
    return "skipped"
