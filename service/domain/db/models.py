"""Tables. The forget payload lives in its own table so it can be purged when its job ends."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)  # public part, for lookup
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    role: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_deletion_requests_tenant_idempotency_key"),
        Index("ix_deletion_requests_tenant_created_at", "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    subject_ref: Mapped[str] = mapped_column(String(256), index=True)
    reason: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n_forget: Mapped[int] = mapped_column(Integer)
    n_retain: Mapped[int] = mapped_column(Integer)
    payload_digest: Mapped[str] = mapped_column(String(64))  # HMAC-SHA256 of the forget payload
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    body_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the canonical body, for Idempotency-Key
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ForgetPayload(Base):
    """The raw data to forget. Deleted when the job ends (any outcome); the purge is audited."""

    __tablename__ = "forget_payloads"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"), primary_key=True)
    forget: Mapped[list[Any]]
    retain: Mapped[list[Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RequestProbe(Base):
    """A forgotten request's items, sealed (AES-GCM under a per-request key kept outside the database) so that
    every later version can be checked against them; plus the plain numbers it was accepted on. The key and
    the ciphertext are destroyed at `expires_at` (crypto-shredding, service/domain/probes.py)."""

    __tablename__ = "request_probes"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id", ondelete="CASCADE"), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)  # nonce + AES-GCM; None once shredded
    n_items: Mapped[int] = mapped_column(Integer)
    baseline: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"before": forget metrics, "thresholds"}
    sealed_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    shredded_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_request_id", "request_id"),
        # one unlearning job per request; withdrawals may be tried again after one failed
        Index("uq_jobs_unlearn_request_id", "request_id", unique=True,
              sqlite_where=text("kind = 'unlearn'"), postgresql_where=text("kind = 'unlearn'")),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"))
    # unlearn: the request's own job (one per request); withdraw: taking a forgotten request out again
    kind: Mapped[str] = mapped_column(String(16), default="unlearn", server_default="unlearn")
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(16))  # training | trained | fusing | publishing
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_loss: Mapped[float | None] = mapped_column(Float)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    verdict: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    model_version: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(16))  # succeeded jobs: forgotten | not_memorized
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    trained_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelVersion(Base):
    """Version N+1 = base + every succeeded request's layer fused. Version 0 (the base) has no row."""

    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(256))
    base_sha256: Mapped[str] = mapped_column(String(64))
    layer_kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)  # file name -> sha256
    request_ids: Mapped[list[Any]] = mapped_column(default=list)
    metrics_summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ServingState(Base):
    """One row (id=1): which version the API processes serve. Version 0 = the base model."""

    __tablename__ = "serving_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    active_version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only hash chain; row_hash as service.domain.audit.chain defines it for the row's hash_version
    (2: SHA-256(prev_hash || SHA-256(canonical row with its salt)); 1, older rows: no salt, no inner hash)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    ts: Mapped[str] = mapped_column(String(32))  # ISO-8601 UTC string exactly as hashed
    event_type: Mapped[str] = mapped_column(String(48), index=True)
    actor: Mapped[str | None] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(String(36), index=True)
    payload: Mapped[str] = mapped_column(Text)  # RFC 8785 canonical JSON
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash_version: Mapped[int] = mapped_column(SmallInteger, server_default="1")
    salt: Mapped[str | None] = mapped_column(String(32))  # hex, version 2 only


class AuditCheckpoint(Base):
    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), index=True)
    row_hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(Text)
    public_key: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
