"""The job state machine: every status a job can have, every allowed transition, and the one way a job
ends (status, timestamps, lease, audit event, payload purge). The API and the workers both use it; an
invalid transition raises InvalidTransition (409), it never writes.

    queued ──lease──> running ──trained, fusion leased──> verifying ──published──> succeeded (forgotten)
      │                  │                                    │
      │                  ├──> succeeded (not_memorized)       ├──> failed (verdict, error)
      │                  ├──> failed                          └──> cancelled
      └──> cancelled     └──> cancelled
      └──> failed (gave up)

A withdrawal job (kind "withdraw", service/domain/withdrawals.py) takes the short path:
    queued ──lease──> running ──published──> succeeded (withdrawn)  | failed | cancelled

`running -> running` and `verifying -> verifying` are lease takeovers (a dead worker's job resumed).
Functions here flush; the caller commits.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy.orm import Session

from service.domain.db.models import Job, utcnow
from service.domain.errors import Conflict
from service.domain.repositories import audit, deletion_requests

JobStatus = Literal["queued", "running", "verifying", "succeeded", "failed", "cancelled"]
# What a succeeded job established: the items were unlearned and a version without them serves, or the
# model never reproduced them (evidence in the job's metrics) and nothing needed to change; for a
# withdrawal job (kind "withdraw"), that a version without the request's unlearning serves.
Outcome = Literal["forgotten", "not_memorized", "withdrawn"]
OUTCOMES: tuple[Outcome, ...] = ("forgotten", "not_memorized", "withdrawn")
ACTIVE: tuple[JobStatus, ...] = ("queued", "running", "verifying")
ENDED: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"running", "verifying", "succeeded", "failed", "cancelled"}),
    "verifying": frozenset({"verifying", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class InvalidTransition(Conflict):
    code = "invalid_transition"


def check_transition(from_status: str, to_status: str) -> None:
    if to_status not in TRANSITIONS.get(from_status, frozenset()):
        raise InvalidTransition(f"a job cannot go from '{from_status}' to '{to_status}'", param="status")


def end(
    session: Session, job: Job, status: Literal["succeeded", "failed", "cancelled"], *, actor: str | None = None,
    outcome: Outcome | None = None, reason: str | None = None, metrics: dict[str, Any] | None = None,
    verdict: dict[str, Any] | None = None, model_version: int | None = None, stage: str | None = None,
    audit_extra: dict[str, Any] | None = None,
) -> None:
    """End `job` with `status`: the row, the `job.<status>` audit event (with the outcome, reason and
    evidence), then the purge of the raw forget payload (its own `payload.purged` event). A succeeded job
    names its outcome; no other ending has one."""
    check_transition(job.status, status)
    if (status == "succeeded") != (outcome is not None) or (outcome is not None and outcome not in OUTCOMES):
        raise ValueError(f"a '{status}' job cannot have outcome {outcome!r}; succeeded jobs take one of {OUTCOMES}")
    job.outcome = outcome
    job.status, job.finished_at = status, utcnow()
    job.lease_owner, job.lease_expires_at = None, None
    if stage is not None:
        job.stage = stage
    if reason is not None:
        job.error = reason
    if metrics is not None:
        job.metrics = metrics
    if verdict is not None:
        job.verdict = verdict
    if model_version is not None:
        job.model_version = model_version
    payload: dict[str, Any] = {"job_id": job.id, "request_id": job.request_id}
    evidence = {"outcome": outcome, "model_version": model_version, "reason": reason, "metrics": metrics,
                "verdict": verdict}
    payload.update({k: v for k, v in evidence.items() if v is not None})
    payload.update(audit_extra or {})
    audit.append_event(session, f"job.{status}", payload, actor=actor, tenant=job.tenant, request_id=job.request_id)
    purge(session, job, actor=actor)


def purge(session: Session, job: Job, actor: str | None) -> None:
    """Delete the raw forget text; audited once (a second purge of the same request is a no-op)."""
    if deletion_requests.purge_payload(session, job.request_id):
        audit.append_event(
            session, "payload.purged", {"job_id": job.id, "request_id": job.request_id},
            actor=actor, tenant=job.tenant, request_id=job.request_id,
        )
