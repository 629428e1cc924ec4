"""Sealed request probes (see service/domain/probes.py for what they are and how they are protected)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.db.models import RequestProbe


def add_probe(session: Session, probe: RequestProbe) -> RequestProbe:
    session.add(probe)
    session.flush()
    return probe


def get_probe(session: Session, request_id: str) -> RequestProbe | None:
    return session.get(RequestProbe, request_id)


def probes_for(session: Session, request_ids: Iterable[str]) -> dict[str, RequestProbe]:
    """The probe rows of these requests (shredded ones included), by request id."""
    ids = list(request_ids)
    if not ids:
        return {}
    return {p.request_id: p for p in session.scalars(select(RequestProbe).where(RequestProbe.request_id.in_(ids)))}


def expired_probes(session: Session, now: datetime) -> list[RequestProbe]:
    """Probes past their retention window and not yet shredded, oldest first."""
    query = (select(RequestProbe)
             .where(RequestProbe.expires_at <= now, RequestProbe.shredded_at.is_(None))
             .order_by(RequestProbe.expires_at))
    return list(session.scalars(query))
