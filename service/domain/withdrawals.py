"""Withdrawal: take a forgotten request out of the served model again (a wrongful or duplicate request).

    POST /v1/deletion-requests/{id}/withdraw {"reason"} (admin)
      -> a job of kind "withdraw", on the fusion queue (serialised with fusion, workers/withdrawal_step.py):
         the active version's fusion sums minus the request's sealed contribution, solved again, every
         other request of the version re-checked, published as a new version without it (its parent the
         active version); then the request's probes are shredded.

Possible while the request's probes are kept (UNLEARN_PROBE_RETENTION_DAYS): its contribution is sealed
under the same key. Later, activating a version without it is the way (audited with what it re-exposes).
Functions here flush; the caller commits, then enqueues.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.domain.db.models import Job
from service.domain.db.session import write_lock
from service.domain.errors import Conflict, NotFound
from service.domain.job_states import ACTIVE
from service.domain.principal import Principal
from service.domain.repositories import audit, deletion_requests, jobs, model_versions, probes

QUEUED_STAGE, RUNNING_STAGE = "withdraw", "withdrawing"


class NotWithdrawable(Conflict):
    code = "not_withdrawable"


def request_withdrawal(session: Session, principal: Principal, request_id: str, reason: str) -> Job:
    """A queued withdrawal job for `request_id`, audited as `request.withdrawal_requested`; or a 404 / 409
    that says why not."""
    write_lock(session)
    request = deletion_requests.get_request(session, request_id, principal.tenant_scope)
    own_job = jobs.get_job_for_request(session, request_id) if request else None
    if request is None or own_job is None:
        raise NotFound(f"deletion request {request_id} not found", param="request_id")
    if own_job.outcome != "forgotten":
        raise NotWithdrawable(f"only a request whose job ended succeeded / forgotten changed the model; this one's "
                              f"job is {own_job.status}" + (f" / {own_job.outcome}" if own_job.outcome else ""),
                              param="request_id")
    earlier = jobs.get_job_for_request(session, request_id, "withdraw")
    if earlier is not None and (earlier.status in ACTIVE or earlier.status == "succeeded"):
        state = "withdrawn" if earlier.status == "succeeded" else "being withdrawn"
        raise NotWithdrawable(f"the request is already {state} (job {earlier.id})", param="request_id")
    active = model_versions.active_version(session)
    version = model_versions.get_version(session, active) if active else None
    if version is None or request_id not in version.request_ids:
        raise NotWithdrawable(f"the served version {active} does not contain this request: nothing to withdraw",
                              param="request_id")
    probe = probes.get_probe(session, request_id)
    if probe is None or probe.shredded_at is not None:
        raise NotWithdrawable("the request's sealed contribution is no longer kept (its retention window ended, or it "
                              "was never kept); activate a version without it instead", param="request_id")
    job = jobs.add_job(session, Job(request_id=request_id, tenant=request.tenant, kind="withdraw", status="queued",
                                    stage=QUEUED_STAGE))
    audit.append_event(session, "request.withdrawal_requested",
                       {"request_id": request_id, "job_id": job.id, "reason": reason, "version": active},
                       actor=principal.key_id, tenant=request.tenant, request_id=request_id)
    return job
