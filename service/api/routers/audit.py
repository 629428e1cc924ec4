"""GET /v1/audit (the compliance log, cursor-paginated) and GET /v1/audit/verify (recompute the chain)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import AuditorDep, SessionDep, SettingsDep
from service.api.schemas import AuditEventOut, AuditPage
from service.domain.audit.service import ChainVerification, verify_database_chain
from service.domain.repositories import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage)
def list_audit_events(
    session: SessionDep, principal: AuditorDep,
    cursor: Annotated[int, Query(ge=0, le=2**62, description="seq of the last event seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    type: Annotated[str | None, Query(max_length=48)] = None,  # noqa: A002
    request_id: Annotated[str | None, Query(max_length=36)] = None,
    subject_ref: Annotated[str | None, Query(max_length=200)] = None,
    since: datetime | None = None, until: datetime | None = None,
) -> AuditPage:
    """Events of your tenant (all tenants for admin keys), oldest first. Payloads carry HMAC digests of the
    forget data, never the data."""
    rows = audit.list_events(
        session, tenant=principal.tenant_scope, after_seq=cursor, limit=limit + 1, event_type=type,
        request_id=request_id, subject_ref=subject_ref, since=since, until=until,
    )
    page = [AuditEventOut(**audit.event_as_dict(e)) for e in rows[:limit]]
    return AuditPage(data=page, next_cursor=page[-1].seq if len(rows) > limit else None)


@router.get("/verify", response_model=ChainVerification)
def verify_audit_chain(session: SessionDep, settings: SettingsDep, principal: AuditorDep) -> ChainVerification:
    """Recompute every row hash and link, and check the signed checkpoints of the head."""
    return verify_database_chain(session, settings.data_dir)
