"""Task step 2 (the single fusion consumer): fuse the staged layer with every earlier request's by EUL's
closed-form regression, verify before vs after (and every earlier request of the lineage on the new
version), and publish version N+1 atomically with the request's probes sealed, or fail cleanly.

    lease (db) -> FusionJob -> [heartbeat] fuse + verify -> Candidate -> publishing.publish"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from service.domain import job_states, probes
from service.domain.db.session import write_lock
from service.domain.repositories import deletion_requests, jobs, model_versions
from workers.context import WorkerContext
from workers.endings import cancel, fail
from workers.engine.config import LayerConfig
from workers.progress import LeaseHeartbeat
from workers.publishing import Candidate, Release, publish, record_refused, remove_orphan
from workers.settings_map import fusion_config, layer_config


@dataclass(frozen=True)
class FusionJob:
    """What the fusion step read about its job under the lease, before the long, db-free part."""

    job_id: str
    request_id: str
    tenant: str
    params: dict[str, Any]
    forget_rows: list[dict[str, Any]]
    retain_rows: list[dict[str, Any]]
    parent_version: int  # the active version: this request fuses onto its lineage (0 = the base model)
    version: int  # the number the new version gets: one past the latest, whichever lineage that was on
    parent_manifest_sha256: str | None
    parent_kind: str | None
    precheck: dict[str, Any]  # metrics the training step measured before training (the memorisation check)
    lineage: probes.Lineage  # the parent's requests: opened probes to re-check, and which cannot be

    def release(self) -> Release:
        return Release(self.job_id, self.request_id, self.tenant, self.parent_version, self.version, self.lineage)


def run_fusion(ctx: WorkerContext, job_id: str) -> str:
    """Returns 'published', 'failed', 'cancelled' or 'skipped' (a duplicate or stale message)."""
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job is None:
            return "skipped"
        if job.cancel_requested and job.status not in job_states.ENDED:
            session.commit()
            return cancel(ctx, job_id)
        won = jobs.try_lease(
            session, job_id, owner=ctx.owner, from_statuses=("running", "verifying"), stages=("trained", "fusing"),
            to_status="verifying", to_stage="fusing", lease_seconds=ctx.settings.job_lease_seconds,
            max_attempts=ctx.settings.job_max_attempts + 1, count_attempt=False,
        )
        if not won:
            session.commit()
            return "skipped"
        fusion_job = _read_job(ctx, session, job_id)
        session.commit()
    if fusion_job is None:
        return fail(ctx, job_id, "the forget payload is gone; cannot verify")

    with LeaseHeartbeat(ctx, job_id):  # fusion and verification report no progress and may outlast the lease
        layer = layer_config(ctx.settings, fusion_job.params)
        if fusion_job.parent_kind not in (None, layer.kind):
            return fail(ctx, job_id, f"layer '{layer.kind}' cannot fuse onto the served chain of "
                                     f"'{fusion_job.parent_kind}' layers")
        candidate, trained = _fuse_and_verify(ctx, fusion_job, layer)
        if ctx.store.exists(fusion_job.version):  # left by a worker killed between its files and its commit
            remove_orphan(ctx, fusion_job.version)
        if not candidate.passed:
            reason = "verification failed: " + "; ".join(candidate.verdict["reasons"])  # >= 1 reason when failed
            record_refused(ctx, fusion_job.release(), candidate)
            return fail(ctx, job_id, reason, metrics=candidate.metrics, verdict=candidate.verdict)
        return _publish(ctx, fusion_job, candidate, trained)


def _read_job(ctx: WorkerContext, session: Session, job_id: str) -> FusionJob | None:
    """The job's inputs, or None when its forget payload is gone. The parent's requests' probes are
    decrypted here, held in memory for this job only."""
    job = jobs.get_job(session, job_id)
    request = deletion_requests.get_request(session, job.request_id, None)
    payload = deletion_requests.get_payload(session, job.request_id)
    if payload is None:
        return None
    parent_version = model_versions.active_version(session)
    parent_row = model_versions.get_version(session, parent_version) if parent_version else None
    return FusionJob(
        job_id=job_id, request_id=job.request_id, tenant=job.tenant, params=dict(request.params),
        forget_rows=list(payload.forget), retain_rows=list(payload.retain), parent_version=parent_version,
        version=model_versions.latest_version_number(session) + 1,
        parent_manifest_sha256=parent_row.manifest_sha256 if parent_row else None,
        parent_kind=parent_row.layer_kind if parent_row else None, precheck=dict(job.metrics or {}),
        lineage=probes.open_lineage(session, ctx.settings, list(parent_row.request_ids) if parent_row else []),
    )


def _fuse_and_verify(ctx: WorkerContext, job: FusionJob, layer: LayerConfig) -> tuple[Candidate, Any]:
    """The verified candidate, and the staged layer it fused (engine.unlearn.TrainedLayer)."""
    from workers.engine.data import parse_examples
    from workers.engine.fusion import state_from_tensors
    from workers.engine.unlearn import fuse, trained_from_tensors
    from workers.engine.versions import load_version
    from workers.verification import verify

    tensors, meta = ctx.store.load_staged(job.job_id)
    trained = trained_from_tensors(tensors, meta)
    parent_state, parent_maps = None, None
    if job.parent_version:
        parent = load_version(ctx.store, job.parent_version, ctx.base.source_sha256, job.parent_manifest_sha256)
        parent_state = state_from_tensors(parent.fusion_state)
        parent_maps = parent.fused_maps
    state, fused_maps = fuse(parent_state, trained, job.request_id, fusion_config(ctx.settings))
    forget, retain = parse_examples(job.forget_rows), parse_examples(job.retain_rows)
    probe = ctx.neighbourhood(forget).probe if ctx.settings.neighbourhood else None
    checked = verify(ctx, layer, parent_maps, fused_maps, forget, retain, job.params, probe, job.lineage)
    metrics = {**job.precheck, **checked.metrics}
    return Candidate(layer, state, fused_maps, metrics, checked.verdict, checked.earlier), trained


def _publish(ctx: WorkerContext, job: FusionJob, candidate: Candidate, trained: Any) -> str:
    """Publish, sealing the request's items and its own fusion terms (for later re-checks and withdrawal)."""
    from workers.engine.fusion import contribution, state_to_tensors
    from workers.engine.store import save_safetensors_bytes

    own_terms = save_safetensors_bytes(state_to_tensors(contribution(trained.grams, trained.maps, job.request_id),
                                                        torch.float32))
    baseline = {"before": candidate.metrics["base"]["forget"], "thresholds": candidate.verdict["thresholds"]}

    def seal_probes(session: Session) -> None:
        probes.seal(session, ctx.settings, job.request_id, job.tenant, job.forget_rows, baseline, own_terms)

    return publish(ctx, job.release(), candidate, "forgotten", seal_probes)
