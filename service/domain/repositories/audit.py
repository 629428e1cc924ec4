"""Audit events: append-only hash chain rows and signed checkpoints of its head.

`append_event` must run in the same transaction as the state change it records; it takes the database
write lock first, so appends from the API and the workers are serialised and seq has no gaps.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain.audit.chain import GENESIS, HASH_VERSION, canonical, compute_row_hash, format_ts
from service.domain.db.models import AuditCheckpoint, AuditEvent, DeletionRequest, utcnow
from service.domain.db.session import write_lock


def head(session: Session) -> AuditEvent | None:
    return session.scalar(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(1))


def append_event(
    session: Session,
    event_type: str,
    payload: dict[str, Any],
    *,
    actor: str | None = None,
    tenant: str | None = None,
    request_id: str | None = None,
) -> AuditEvent:
    write_lock(session)
    last = head(session)
    seq = 1 if last is None else last.seq + 1
    prev = GENESIS if last is None else last.row_hash
    event = AuditEvent(
        seq=seq,
        ts=format_ts(utcnow()),
        event_type=event_type,
        actor=actor,
        tenant=tenant,
        request_id=request_id,
        payload=canonical(payload).decode(),
        prev_hash=prev,
        hash_version=HASH_VERSION,
        salt=secrets.token_hex(16),
    )
    event.row_hash = compute_row_hash(event_as_dict(event), prev)
    session.add(event)
    session.flush()
    return event


def list_events(
    session: Session,
    *,
    tenant: str | None,
    after_seq: int = 0,
    limit: int = 100,
    event_type: str | None = None,
    request_id: str | None = None,
    subject_ref: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[AuditEvent]:
    """Events in seq order after a cursor; tenant=None means all tenants (admin)."""
    query = select(AuditEvent).where(AuditEvent.seq > after_seq)
    if tenant is not None:
        query = query.where(AuditEvent.tenant == tenant)
    if event_type is not None:
        query = query.where(AuditEvent.event_type == event_type)
    if request_id is not None:
        query = query.where(AuditEvent.request_id == request_id)
    if subject_ref is not None:
        ids = select(DeletionRequest.id).where(DeletionRequest.subject_ref == subject_ref)
        query = query.where(AuditEvent.request_id.in_(ids))
    if since is not None:
        query = query.where(AuditEvent.ts >= format_ts(since))
    if until is not None:
        query = query.where(AuditEvent.ts < format_ts(until))
    return list(session.scalars(query.order_by(AuditEvent.seq).limit(limit)))


def iter_all_events(session: Session, batch: int = 1000) -> Iterator[AuditEvent]:
    after = 0
    while True:
        rows = list(
            session.scalars(select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(batch))
        )
        if not rows:
            return
        yield from rows
        after = rows[-1].seq


def count_events(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(AuditEvent)) or 0


def add_checkpoint(session: Session, signed: dict[str, Any]) -> AuditCheckpoint:
    checkpoint = AuditCheckpoint(
        seq=signed["seq"],
        row_hash=signed["row_hash"],
        signature=signed["signature_b64"],
        public_key=signed["public_key_b64"],
        key_id=signed["key_id"],
    )
    session.add(checkpoint)
    session.flush()
    return checkpoint


def list_checkpoints(session: Session) -> list[AuditCheckpoint]:
    return list(session.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq, AuditCheckpoint.id)))


def latest_checkpoint(session: Session) -> AuditCheckpoint | None:
    return session.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1))


def event_as_dict(event: AuditEvent) -> dict[str, Any]:
    """The exported/verified form of a row (payload decoded back to JSON)."""
    return {
        "seq": event.seq,
        "ts": event.ts,
        "type": event.event_type,
        "actor": event.actor,
        "tenant": event.tenant,
        "request_id": event.request_id,
        "payload": json.loads(event.payload),
        "prev_hash": event.prev_hash,
        "row_hash": event.row_hash,
        "hash_version": event.hash_version,
        "salt": event.salt,
    }
