"""GET /v1/audit (the compliance log, cursor-paginated), GET /v1/audit/verify (recompute the chain) and
POST /v1/audit/export (sign the head, download the chain for `unlearn audit verify`)."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import AuditorDep, SessionDep, SettingsDep
from service.api.schemas import AuditEventOut, AuditPage
from service.domain.audit.service import ChainVerification, checkpoint_now, export_chain, verify_database_chain
from service.domain.errors import Forbidden
from service.domain.repositories import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"])

# query parameter types, shared with the console's audit page
Cursor = Annotated[int, Query(ge=0, le=2**62, description="seq of the last event seen")]
Limit = Annotated[int, Query(ge=1, le=500)]
EventType = Annotated[str | None, Query(max_length=48)]
RequestId = Annotated[str | None, Query(max_length=36)]


@router.get("", response_model=AuditPage)
def list_audit_events(
    session: SessionDep, principal: AuditorDep,
    cursor: Cursor = 0, limit: Limit = 100, type: EventType = None,  # noqa: A002
    request_id: RequestId = None,
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


@router.post("/export", response_class=FileResponse, responses={200: {"content": {"application/jsonl": {}}}})
def export_audit_chain(
    session: SessionDep, settings: SettingsDep, principal: AuditorDep,
    tenant: Annotated[str | None, Query(max_length=64, description="admin only: that tenant's view")] = None,
) -> FileResponse:
    """Sign the head now, then download the chain as JSON Lines that `unlearn audit verify FILE` checks
    offline. An auditor gets its tenant's export: its own events in full, every other row redacted to its
    hashes (the links and the signed head still verify; nothing of other tenants is shown but that rows
    exist). An admin gets the whole chain, or with ?tenant= the export that tenant's auditor would get."""
    if tenant is not None and principal.tenant_scope not in (None, tenant):
        raise Forbidden("an auditor exports its own tenant's view only", param="tenant")
    scope = principal.tenant_scope if tenant is None else tenant
    checkpoint_now(session, settings.data_dir)
    session.commit()
    folder = Path(tempfile.mkdtemp(prefix="unlearn-audit-"))
    out = folder / "audit-export.jsonl"

    def remove() -> None:
        shutil.rmtree(folder, ignore_errors=True)

    try:
        export_chain(session, settings.data_dir, out, tenant=scope)
    except BaseException:
        remove()
        raise
    return FileResponse(out, media_type="application/jsonl", filename=out.name, background=BackgroundTask(remove))
