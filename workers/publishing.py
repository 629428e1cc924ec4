"""Publishing a new model version: the one place a job turns a verified candidate into the served model.
Used by fusion (a request fused in, workers/fusion_step.py) and withdrawal (one taken out,
workers/withdrawal_step.py).

    files (store.publish: temp dir, fsync, rename) -> read back -> db under the write lock: still our lease and
    nothing moved? -> version row, active, per-request re-check events, version.published, the caller's
    finish (seal / shred probes), job ending -> commit -> announce
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.orm import Session

from service.domain import job_states, probes
from service.domain.db.models import ModelVersion
from service.domain.db.session import write_lock
from service.domain.events import announce_version
from service.domain.job_states import Outcome
from service.domain.repositories import audit, deletion_requests, jobs, model_versions
from workers.context import WorkerContext
from workers.endings import cancel
from workers.engine.config import LayerConfig

log = structlog.get_logger("unlearn.worker")


@dataclass(frozen=True)
class Release:
    """What a job read under its lease about the version it is making."""

    job_id: str
    request_id: str  # the request fused in, or withdrawn
    tenant: str
    parent_version: int  # the active version: the new one continues its lineage (0 = the base model)
    version: int  # one past the latest, whichever lineage that was on
    lineage: probes.Lineage  # the other requests the new version carries: opened probes, and which cannot be


@dataclass
class Candidate:
    """The new version before it is published: fused, verified, not yet on disk."""

    layer: LayerConfig
    state: Any  # workers.engine.fusion.FusionState: the running sums, request ids included
    fused_maps: dict[str, Any]
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    earlier: dict[str, dict[str, Any]]  # other request id -> its re-check on this version

    @property
    def passed(self) -> bool:
        return bool(self.verdict["passed"])


def publish(ctx: WorkerContext, release: Release, candidate: Candidate, outcome: Outcome,
            finish: Callable[[Session], None], event_extra: dict[str, Any] | None = None) -> str:
    """Returns 'published', or 'skipped' / 'cancelled' when the job is no longer ours or the active version
    moved since it was read (the message is re-run later on the new state)."""
    from workers.engine.fusion import state_to_tensors
    from workers.engine.store import FUSED_MAPS, FUSION_STATE
    from workers.engine.versions import new_manifest

    version, base = release.version, ctx.base
    if ctx.store.exists(version):
        remove_orphan(ctx, version)
    manifest = new_manifest(release.parent_version, base.name, base.source_sha256, candidate.layer,
                            list(candidate.state.request_ids), release.job_id)
    files_out = {FUSED_MAPS: candidate.fused_maps, FUSION_STATE: state_to_tensors(candidate.state)}
    path = ctx.store.publish(version, files_out, manifest)
    test_crash_point("after_publish")
    written = ctx.store.verify(version)  # read back: what the db records is what is on disk
    with ctx.session() as session:
        write_lock(session)
        row = jobs.get_job(session, release.job_id)
        still_ours = row.lease_owner == ctx.owner and not row.cancel_requested
        moved = (model_versions.active_version(session) != release.parent_version
                 or model_versions.latest_version_number(session) != version - 1)
        if not still_ours or moved:  # an activation or another publish since we read: run again later
            session.rollback()
            remove_orphan(ctx, version)
            return cancel(ctx, release.job_id) if row.cancel_requested else "skipped"
        version_row = model_versions.add_version(session, ModelVersion(
            version=version, parent_version=release.parent_version, base_model=base.name,
            base_sha256=base.source_sha256, layer_kind=candidate.layer.kind, path=str(path),
            manifest_sha256=ctx.store.manifest_sha256(version), files=dict(written["files"]),
            request_ids=manifest["request_ids"], metrics_summary=summarise(candidate.metrics),
            job_id=release.job_id,
        ))
        model_versions.set_active_version(session, version)
        record_rechecks(session, release, candidate, version)
        audit.append_event(
            session, "version.published",
            {"version": version, "parent_version": release.parent_version, "job_id": release.job_id,
             "request_id": release.request_id, "files": version_row.files,
             "manifest_sha256": version_row.manifest_sha256, "base_sha256": base.source_sha256, **(event_extra or {})},
            tenant=release.tenant, request_id=release.request_id,
        )
        finish(session)
        job_states.end(session, row, "succeeded", outcome=outcome, stage="published", model_version=version,
                       metrics=candidate.metrics, verdict=candidate.verdict,
                       audit_extra={"version_files": version_row.files})
        session.commit()
    ctx.store.discard_staged(release.job_id)
    announce_version(ctx.settings, version)
    log.info("job.published", job_id=release.job_id, version=version, outcome=outcome)
    return "published"


def record_rechecks(session: Session, release: Release, candidate: Candidate, version: int | None) -> None:
    """One `request.reverified` event per other request of the version, in that request's tenant: its
    evidence that the new version still forgets it, or why it could not be checked. version None: a
    candidate that was refused (it failed a check), recorded by `record_refused`."""
    for request_id, result in candidate.earlier.items():
        audit.append_event(
            session, "request.reverified",
            {"request_id": request_id, "version": version, "job_id": release.job_id, "passed": result["passed"],
             "checks": result["checks"]},
            tenant=result["tenant"], request_id=request_id,
        )
    if version is None:
        return
    for request_id, reason in release.lineage.unverifiable.items():
        request = deletion_requests.get_request(session, request_id, None)
        audit.append_event(
            session, "request.reverified",
            {"request_id": request_id, "version": version, "passed": None, "not_reverifiable": reason},
            tenant=request.tenant if request else None, request_id=request_id,
        )


def record_refused(ctx: WorkerContext, release: Release, candidate: Candidate) -> None:
    """The re-checks of a candidate that failed its verdict, before the job ends failed."""
    if not candidate.earlier:
        return
    with ctx.session() as session:
        write_lock(session)
        record_rechecks(session, release, candidate, None)
        session.commit()


def test_crash_point(name: str) -> None:
    """Chaos-test hook, inert unless UNLEARN_TEST_CRASH_AT=<name>: SIGKILL this worker's whole process group
    here, as a machine losing power would (tests/integration/test_chaos.py). Never set in production."""
    if os.environ.get("UNLEARN_TEST_CRASH_AT") == name:
        log.warning("test.crash_point", point=name)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def remove_orphan(ctx: WorkerContext, version: int) -> None:
    """A version directory with no database row was left by a crash between publish and commit."""
    with ctx.session() as session:
        if model_versions.get_version(session, version) is not None:
            raise RuntimeError(f"version {version} exists in the database; refusing to remove it")
    log.warning("version.orphan_removed", version=version)
    shutil.rmtree(ctx.store.path(version))


def summarise(metrics: dict) -> dict:
    """Headline numbers for the version list (the job keeps the full set)."""
    out: dict[str, Any] = {}
    if "earlier_requests" in metrics:
        out["earlier_requests"] = dict(metrics["earlier_requests"])
    if "quantized" in metrics:  # whether the version's quantized export (that format) still forgets
        out["quantized"] = {k: metrics["quantized"][k] for k in ("format", "forgotten")}
    for section in ("forget", "retain", "general", "neighbours"):
        after = (metrics.get("after") or {}).get(section) or {}
        before = (metrics.get("before") or {}).get(section) or {}
        for key in ("nll", "ppl", "rougeL"):
            if key in after:
                out[f"{section}_{key}_before"] = before.get(key)
                out[f"{section}_{key}_after"] = after.get(key)
    return out
