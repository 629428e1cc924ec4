"""Task step 2 (the single fusion consumer): fuse the staged layer with every earlier request's by EUL's
closed-form regression, verify before vs after, and publish version N+1 atomically, or fail cleanly.

    lease (db) -> FusionJob -> [heartbeat] fuse + verify -> Candidate -> publish files, then db + audit"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.orm import Session

from service.domain import job_states
from service.domain.db.models import ModelVersion
from service.domain.db.session import write_lock
from service.domain.events import announce_version
from service.domain.repositories import audit, deletion_requests, jobs, model_versions
from workers.context import WorkerContext
from workers.endings import cancel, fail
from workers.engine.config import LayerConfig
from workers.progress import LeaseHeartbeat
from workers.settings_map import fusion_config, layer_config

log = structlog.get_logger("unlearn.worker")


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


@dataclass
class Candidate:
    """Version N+1 before it is published: fused, verified, not yet on disk."""

    layer: LayerConfig
    state: Any  # workers.engine.fusion.FusionState: the running sums, request ids included
    fused_maps: dict[str, Any]
    metrics: dict[str, Any]
    verdict: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])


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
        fusion_job = _read_job(session, job_id)
        session.commit()
    if fusion_job is None:
        return fail(ctx, job_id, "the forget payload is gone; cannot verify")

    with LeaseHeartbeat(ctx, job_id):  # fusion and verification report no progress and may outlast the lease
        layer = layer_config(ctx.settings, fusion_job.params)
        if fusion_job.parent_kind not in (None, layer.kind):
            return fail(ctx, job_id, f"layer '{layer.kind}' cannot fuse onto the served chain of "
                                     f"'{fusion_job.parent_kind}' layers")
        candidate = _fuse_and_verify(ctx, fusion_job, layer)
        if ctx.store.exists(fusion_job.version):
            _remove_orphan(ctx, fusion_job.version)
        if not candidate.passed:
            reason = "verification failed: " + "; ".join(candidate.verdict["reasons"])  # >= 1 reason when failed
            return fail(ctx, job_id, reason, metrics=candidate.metrics, verdict=candidate.verdict)
        return _publish(ctx, fusion_job, candidate)


def _read_job(session: Session, job_id: str) -> FusionJob | None:
    """The job's inputs, or None when its forget payload is gone."""
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
    )


def _fuse_and_verify(ctx: WorkerContext, job: FusionJob, layer: LayerConfig) -> Candidate:
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
    metrics, verdict = verify(ctx, layer, parent_maps, fused_maps, forget, retain, job.params, probe)
    return Candidate(layer, state, fused_maps, {**job.precheck, **metrics}, verdict)


def _publish(ctx: WorkerContext, job: FusionJob, candidate: Candidate) -> str:
    from workers.engine.fusion import state_to_tensors
    from workers.engine.store import FUSED_MAPS, FUSION_STATE
    from workers.engine.versions import new_manifest

    version, base = job.version, ctx.base
    manifest = new_manifest(job.parent_version, base.name, base.source_sha256, candidate.layer,
                            list(candidate.state.request_ids), job.job_id)
    files_out = {FUSED_MAPS: candidate.fused_maps, FUSION_STATE: state_to_tensors(candidate.state)}
    path = ctx.store.publish(version, files_out, manifest)
    _test_crash_point("after_publish")
    written = ctx.store.verify(version)  # read back: what the db records is what is on disk
    with ctx.session() as session:
        write_lock(session)
        row = jobs.get_job(session, job.job_id)
        still_ours = row.lease_owner == ctx.owner and not row.cancel_requested
        moved = (model_versions.active_version(session) != job.parent_version
                 or model_versions.latest_version_number(session) != job.version - 1)
        if not still_ours or moved:  # an activation or another publish since we read: fuse again later
            session.rollback()
            _remove_orphan(ctx, version)
            return cancel(ctx, job.job_id) if row.cancel_requested else "skipped"
        version_row = model_versions.add_version(session, ModelVersion(
            version=version, parent_version=job.parent_version, base_model=base.name,
            base_sha256=base.source_sha256, layer_kind=candidate.layer.kind, path=str(path),
            manifest_sha256=ctx.store.manifest_sha256(version), files=dict(written["files"]),
            request_ids=manifest["request_ids"], metrics_summary=summarise(candidate.metrics), job_id=job.job_id,
        ))
        model_versions.set_active_version(session, version)
        audit.append_event(
            session, "version.published",
            {"version": version, "parent_version": job.parent_version, "job_id": job.job_id,
             "request_id": job.request_id, "files": version_row.files, "manifest_sha256": version_row.manifest_sha256,
             "base_sha256": base.source_sha256},
            tenant=job.tenant, request_id=job.request_id,
        )
        job_states.end(session, row, "succeeded", outcome="forgotten", stage="published", model_version=version,
                       metrics=candidate.metrics, verdict=candidate.verdict,
                       audit_extra={"version_files": version_row.files})
        session.commit()
    ctx.store.discard_staged(job.job_id)
    announce_version(ctx.settings, version)
    log.info("job.published", job_id=job.job_id, version=version)
    return "published"


def _test_crash_point(name: str) -> None:
    """Chaos-test hook, inert unless UNLEARN_TEST_CRASH_AT=<name>: SIGKILL this worker's whole process group
    here, as a machine losing power would (tests/integration/test_chaos.py). Never set in production."""
    if os.environ.get("UNLEARN_TEST_CRASH_AT") == name:
        log.warning("test.crash_point", point=name)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _remove_orphan(ctx: WorkerContext, version: int) -> None:
    """A version directory with no database row was left by a crash between publish and commit."""
    with ctx.session() as session:
        if model_versions.get_version(session, version) is not None:
            raise RuntimeError(f"version {version} exists in the database; refusing to remove it")
    log.warning("version.orphan_removed", version=version)
    shutil.rmtree(ctx.store.path(version))


def summarise(metrics: dict) -> dict:
    """Headline numbers for the version list (the job keeps the full set)."""
    out = {}
    for section in ("forget", "retain", "general", "neighbours"):
        after = (metrics.get("after") or {}).get(section) or {}
        before = (metrics.get("before") or {}).get(section) or {}
        for key in ("nll", "ppl", "rougeL"):
            if key in after:
                out[f"{section}_{key}_before"] = before.get(key)
                out[f"{section}_{key}_after"] = after.get(key)
    return out
