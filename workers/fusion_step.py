"""Task step 2 (the single fusion consumer): fuse the staged layer with every earlier request's by EUL's
closed-form regression, verify before vs after, and publish version N+1 atomically, or fail cleanly."""

from __future__ import annotations

import os
import shutil
import signal

import structlog

from service import lifecycle
from service.db.models import ModelVersion, utcnow
from service.db.session import write_lock
from service.repositories import audit, deletion_requests, jobs, model_versions
from service.serving_events import announce_version
from workers.context import WorkerContext
from workers.progress import LeaseHeartbeat
from workers.settings_map import fusion_config, layer_config
from workers.training import _end_cancelled, _fail

log = structlog.get_logger("unlearn.worker")


def run_fusion(ctx: WorkerContext, job_id: str) -> str:
    """Returns 'published', 'failed', 'cancelled' or 'skipped' (a duplicate or stale message)."""
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job is None:
            return "skipped"
        if job.cancel_requested and job.status not in jobs.ENDED:
            session.commit()
            return _end_cancelled(ctx, job_id)
        won = jobs.try_lease(
            session, job_id, owner=ctx.owner, from_statuses=("running", "verifying"), stages=("trained", "fusing"),
            to_status="verifying", to_stage="fusing", lease_seconds=ctx.settings.job_lease_seconds,
            max_attempts=ctx.settings.job_max_attempts + 1, count_attempt=False,
        )
        if not won:
            session.commit()
            return "skipped"
        job = jobs.get_job(session, job_id)
        request = deletion_requests.get_request(session, job.request_id, None)
        payload = deletion_requests.get_payload(session, job.request_id)
        parent_version = model_versions.latest_version_number(session)
        parent_row = model_versions.get_version(session, parent_version) if parent_version else None
        session.commit()
        if payload is None:
            return _fail(ctx, job_id, "the forget payload is gone; cannot verify")
        params, request_id, tenant = dict(request.params), job.request_id, job.tenant
        forget_rows, retain_rows = list(payload.forget), list(payload.retain)
        parent_kind = parent_row.layer_kind if parent_row else None

    with LeaseHeartbeat(ctx, job_id):  # fusion and verification report no progress and may outlast the lease
        return _fuse_verify_publish(ctx, job_id, request_id, tenant, params, forget_rows, retain_rows, parent_version,
                                    parent_kind)


def _fuse_verify_publish(ctx, job_id, request_id, tenant, params, forget_rows, retain_rows, parent_version,
                         parent_kind) -> str:  # noqa: ANN001
    from workers.engine.data import parse_examples
    from workers.engine.fusion import state_from_tensors, state_to_tensors
    from workers.engine.store import FUSED_MAPS, FUSION_STATE
    from workers.engine.unlearn import fuse, trained_from_tensors
    from workers.verification import verify

    layer_cfg = layer_config(ctx.settings, params)
    if parent_kind is not None and parent_kind != layer_cfg.kind:
        return _fail(ctx, job_id, f"layer '{layer_cfg.kind}' cannot fuse onto the served chain of '{parent_kind}' layers")
    tensors, meta = ctx.store.load_staged(job_id)
    trained = trained_from_tensors(tensors, meta)
    parent_state, parent_maps = None, None
    if parent_version:
        files, _manifest = ctx.store.load(parent_version)
        parent_state = state_from_tensors(files[FUSION_STATE])
        parent_maps = files[FUSED_MAPS]
    state, fused_maps = fuse(parent_state, trained, request_id, fusion_config(ctx.settings))

    forget, retain = parse_examples(forget_rows), parse_examples(retain_rows)
    metrics, verdict = verify(ctx, layer_cfg, parent_maps, fused_maps, forget, retain, params)
    if ctx.store.exists(parent_version + 1):
        _remove_orphan(ctx, parent_version + 1)
    if not verdict["passed"]:
        return _end_failed_verdict(ctx, job_id, metrics, verdict)
    return _publish(ctx, job_id, request_id, tenant, parent_version, layer_cfg, state, fused_maps, metrics, verdict,
                    state_to_tensors)


def _publish(ctx, job_id, request_id, tenant, parent_version, layer_cfg, state, fused_maps, metrics, verdict,
             state_to_tensors) -> str:  # noqa: ANN001
    version = parent_version + 1
    base = ctx.base
    manifest = {
        "parent_version": parent_version,
        "base_model": {"name": base.name, "sha256": base.source_sha256},
        "layer": layer_cfg.to_dict(),
        "request_ids": list(state.request_ids),
        "job_id": job_id,
    }
    from workers.engine.store import FUSED_MAPS, FUSION_STATE

    files_out = {FUSED_MAPS: fused_maps, FUSION_STATE: state_to_tensors(state)}
    path = ctx.store.publish(version, files_out, manifest)
    _test_crash_point("after_publish")
    written = ctx.store.verify(version)  # read back: what the db records is what is on disk
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        if job.lease_owner != ctx.owner or job.cancel_requested or model_versions.latest_version_number(session) != parent_version:
            session.rollback()
            _remove_orphan(ctx, version)
            if job.cancel_requested:
                return _end_cancelled(ctx, job_id)
            return "skipped"
        files = dict(written["files"])
        row = model_versions.add_version(session, ModelVersion(
            version=version, parent_version=parent_version, base_model=base.name, base_sha256=base.source_sha256,
            layer_kind=layer_cfg.kind, path=str(path), manifest_sha256=ctx.store.manifest_sha256(version),
            files=files, request_ids=manifest["request_ids"], metrics_summary=summarise(metrics), job_id=job_id,
        ))
        model_versions.set_active_version(session, version)
        audit.append_event(
            session, "version.published",
            {"version": version, "parent_version": parent_version, "job_id": job_id, "request_id": request_id,
             "files": row.files, "manifest_sha256": row.manifest_sha256, "base_sha256": base.source_sha256},
            tenant=tenant, request_id=request_id,
        )
        job.status, job.stage, job.model_version = "succeeded", "published", version
        job.metrics, job.verdict, job.finished_at, job.lease_owner = metrics, verdict, utcnow(), None
        audit.append_event(
            session, "job.succeeded",
            {"job_id": job_id, "request_id": request_id, "model_version": version, "metrics": metrics,
             "verdict": verdict, "version_files": row.files},
            tenant=tenant, request_id=request_id,
        )
        lifecycle.purge(session, job, actor=None)
        session.commit()
    ctx.store.discard_staged(job_id)
    announce_version(ctx.settings, version)
    log.info("job.published", job_id=job_id, version=version)
    return "published"


def _test_crash_point(name: str) -> None:
    """Chaos-test hook, inert unless UNLEARN_TEST_CRASH_AT=<name>: SIGKILL this worker's whole process group
    here, as a machine losing power would (tests/integration/test_chaos.py). Never set in production."""
    if os.environ.get("UNLEARN_TEST_CRASH_AT") == name:
        log.warning("test.crash_point", point=name)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def _end_failed_verdict(ctx: WorkerContext, job_id: str, metrics: dict, verdict: dict) -> str:
    with ctx.session() as session:
        write_lock(session)
        job = jobs.get_job(session, job_id)
        reason = "verification failed: " + "; ".join(verdict["reasons"])  # a failed verdict has >= 1 reason
        job.status, job.error, job.metrics, job.verdict = "failed", reason, metrics, verdict
        job.finished_at, job.lease_owner = utcnow(), None
        audit.append_event(
            session, "job.failed",
            {"job_id": job_id, "request_id": job.request_id, "reason": reason, "metrics": metrics, "verdict": verdict},
            tenant=job.tenant, request_id=job.request_id,
        )
        lifecycle.purge(session, job, actor=None)
        session.commit()
    ctx.store.discard_staged(job_id)
    return "failed"


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
    for section in ("forget", "retain", "general"):
        after = (metrics.get("after") or {}).get(section) or {}
        before = (metrics.get("before") or {}).get(section) or {}
        for key in ("nll", "ppl"):
            if key in after:
                out[f"{section}_{key}_before"] = before.get(key)
                out[f"{section}_{key}_after"] = after.get(key)
    return out
