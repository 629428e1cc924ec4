"""Business operations on model versions: activation (rollback / roll forward). Flushes; the caller
commits, then announces the new active version (a hint to every API process; the database is the truth)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.domain.db.session import write_lock
from service.domain.errors import NotFound
from service.domain.principal import Principal
from service.domain.repositories import audit, model_versions


def activate(session: Session, principal: Principal, version: int) -> None:
    """Serve `version` (0 = the base model) and make it the lineage new requests are fused onto: a rollback
    sticks, and what it rolled away from comes back only by activating that version again. Moving to a
    version without some of the active version's requests re-exposes what they removed: the audit event
    lists those requests (`reexposed_request_ids`)."""
    write_lock(session)
    if version != 0 and model_versions.get_version(session, version) is None:
        raise NotFound(f"model version {version} not found", param="version")
    previous = model_versions.active_version(session)
    model_versions.set_active_version(session, version)
    audit.append_event(
        session, "version.activated",
        {"version": version, "previous_version": previous,
         "reexposed_request_ids": model_versions.requests_not_in(session, version, than=previous)},
        actor=principal.key_id, tenant=principal.tenant,
    )
