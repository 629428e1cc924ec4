"""Response models of the v1 API's resources (deletion requests, jobs, audit, model versions)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.domain.job_states import JobStatus, Outcome


class Progress(BaseModel):
    step: int
    total: int
    loss: float | None
    eta_seconds: float | None


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    trained_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobOut(BaseModel):
    id: str
    request_id: str
    kind: str = Field("unlearn", description="'unlearn' (the request's own job) or 'withdraw' (taking it out again)")
    status: JobStatus
    outcome: Outcome | None = Field(
        None, description="Set when succeeded: 'forgotten' (unlearned; model_version serves without the data),"
        " 'not_memorized' (the model did not reproduce the data before any change; evidence in metrics.memorization)"
        " or, for a withdrawal job, 'withdrawn' (model_version serves without this request's unlearning)",
    )
    stage: str | None
    attempts: int
    cancel_requested: bool
    progress: Progress
    timings: Timings
    error: str | None
    model_version: int | None
    metrics: dict[str, Any] | None = Field(
        None, description="Verification metrics before/after. Evidence, not proof of erasure."
    )
    verdict: dict[str, Any] | None


class ProbesOut(BaseModel):
    """The request's items kept sealed (encrypted, key outside the database) so later versions are checked
    against them; destroyed at expires_at (crypto-shredding)."""

    n_items: int
    sealed_at: datetime
    expires_at: datetime
    shredded_at: datetime | None


class DeletionRequestOut(BaseModel):
    id: str
    tenant: str
    subject_ref: str
    reason: str
    method: str
    params: dict[str, Any]
    n_forget: int
    n_retain: int
    payload_digest: str
    created_at: datetime
    job: JobOut
    probes: ProbesOut | None = None  # set once the job ended "forgotten" (and retention is not 0)
    withdrawal: JobOut | None = None  # the latest withdrawal job, if an admin withdrew the request


class WithdrawalCreate(BaseModel):
    reason: str = Field(min_length=1, max_length=500, description="Why the request is withdrawn (audited)")


class DeletionRequestPage(BaseModel):
    data: list[DeletionRequestOut]
    offset: int
    limit: int
    next_offset: int | None


# ---------------------------------------------------------------- audit


class AuditEventOut(BaseModel):
    seq: int
    ts: str
    type: str
    actor: str | None
    tenant: str | None
    request_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    row_hash: str
    hash_version: int = Field(description="2: row_hash = SHA-256(prev_hash || SHA-256(JCS(row, salt))); 1: older")
    salt: str | None = Field(description="hex; hashed with the row (version 2)")


class AuditPage(BaseModel):
    data: list[AuditEventOut]
    next_cursor: int | None


# ---------------------------------------------------------------- model versions


class ModelVersionOut(BaseModel):
    version: int
    parent_version: int | None
    created_at: datetime | None
    base_model: str
    layer_kind: str | None
    request_ids: list[str]
    files: dict[str, str]
    metrics_summary: dict[str, Any]
    active: bool


class ModelVersionList(BaseModel):
    data: list[ModelVersionOut]
    active_version: int
