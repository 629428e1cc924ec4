"""Task: withdraw a forgotten request (service/domain/withdrawals.py). The active version's fusion sums minus
the request's sealed contribution, solved again: the fusion that never had it, with no retraining; every
other request of the version re-checked on the result; published as a new version without it, and the
request's probes shredded.

    lease (db: queued -> running) -> Withdrawal -> [heartbeat] remove + solve + re-check -> publishing.publish
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlalchemy.orm import Session

from service.domain import job_states, probes
from service.domain.db.models import Job, utcnow
from service.domain.db.session import write_lock
from service.domain.repositories import jobs, model_versions
from service.domain.repositories import probes as probe_rows
from service.domain.withdrawals import QUEUED_STAGE, RUNNING_STAGE
from workers.context import WorkerContext
from workers.endings import fail, give_up_if_exhausted
from workers.progress import LeaseHeartbeat
from workers.publishing import Candidate, Release, publish, record_refused
from workers.settings_map import fusion_config


@dataclass(frozen=True)
class Withdrawal:
    """What the step read under its lease: the version to take the request out of, and the request's own
    sealed probe and fusion terms (decrypted, in memory for this job only)."""

    release: Release  # request_id: the request withdrawn; lineage: the requests that stay
    parent_manifest_sha256: str
    withdrawn: probes.OpenedProbe
    contribution: bytes  # safetensors of its FusionState terms (engine.fusion.contribution)


def run_withdrawal(ctx: WorkerContext, job_id: str) -> str:
    """Returns 'published', 'failed', 'cancelled' or 'skipped' (a duplicate or stale message)."""
    with ctx.session() as session:
        leased = _lease(ctx, session, job_id)
        plan = _read(ctx, session, jobs.get_job(session, job_id)) if leased == "leased" else None
        session.commit()
    if leased != "leased":
        return leased
    if isinstance(plan, str):
        return fail(ctx, job_id, plan)
    with LeaseHeartbeat(ctx, job_id):
        candidate = _remove_and_verify(ctx, plan)
        if not candidate.passed:
            record_refused(ctx, plan.release, candidate)
            reason = "verification failed: " + "; ".join(candidate.verdict["reasons"])
            return fail(ctx, job_id, reason, metrics=candidate.metrics, verdict=candidate.verdict)

        def shred_probes(session: Session) -> None:
            probes.shred(session, ctx.settings, probe_rows.get_probe(session, plan.release.request_id), "withdrawn")

        return publish(ctx, plan.release, candidate, "withdrawn", shred_probes,
                       {"withdrawn_request_id": plan.release.request_id})


def _lease(ctx: WorkerContext, session: Session, job_id: str) -> str:
    write_lock(session)
    job = jobs.get_job(session, job_id)
    if job is None or job.kind != "withdraw":
        return "skipped"
    if job.cancel_requested and job.status not in job_states.ENDED:
        job_states.end(session, job, "cancelled")
        return "cancelled"
    won = jobs.try_lease(
        session, job_id, owner=ctx.owner, from_statuses=("queued", "running"), stages=(QUEUED_STAGE, RUNNING_STAGE),
        to_status="running", to_stage=RUNNING_STAGE, lease_seconds=ctx.settings.job_lease_seconds,
        max_attempts=ctx.settings.job_max_attempts, count_attempt=True,
    )
    if won:
        job = jobs.get_job(session, job_id)
        job.started_at = job.started_at or utcnow()
        return "leased"
    return "failed" if give_up_if_exhausted(session, jobs.get_job(session, job_id), ctx.settings.job_max_attempts) \
        else "skipped"


def _read(ctx: WorkerContext, session: Session, job: Job) -> Withdrawal | str:
    """The plan, or why the withdrawal cannot go on (the job then fails with it)."""
    active = model_versions.active_version(session)
    row = model_versions.get_version(session, active) if active else None
    if row is None or job.request_id not in row.request_ids:
        return f"the served version {active} no longer contains the request (the active version moved)"
    own = probes.open_lineage(session, ctx.settings, [job.request_id])
    if not own.opened:
        return f"the request's probes cannot be opened: {own.unverifiable[job.request_id]}"
    try:
        terms = probes.open_contribution(ctx.settings, job.request_id)
    except (OSError, InvalidTag) as exc:
        return f"the request's sealed contribution cannot be opened: {type(exc).__name__}"
    others = [r for r in row.request_ids if r != job.request_id]
    release = Release(job.id, job.request_id, job.tenant, active, model_versions.latest_version_number(session) + 1,
                      probes.open_lineage(session, ctx.settings, others))
    return Withdrawal(release, row.manifest_sha256, own.opened[0], terms)


def _remove_and_verify(ctx: WorkerContext, plan: Withdrawal) -> Candidate:
    from safetensors.torch import load as load_safetensors_bytes

    from workers.engine.fusion import remove, solve, state_from_tensors
    from workers.engine.versions import load_version
    from workers.verification import verify_withdrawal

    release = plan.release
    parent = load_version(ctx.store, release.parent_version, ctx.base.source_sha256, plan.parent_manifest_sha256)
    own_terms = state_from_tensors(load_safetensors_bytes(plan.contribution))
    state = remove(state_from_tensors(parent.fusion_state), own_terms)
    fused_maps = solve(state, fusion_config(ctx.settings))
    checked = verify_withdrawal(ctx, parent.layer, parent.fused_maps, fused_maps, plan.withdrawn, release.lineage)
    return Candidate(parent.layer, state, fused_maps, checked.metrics, checked.verdict, checked.earlier)
