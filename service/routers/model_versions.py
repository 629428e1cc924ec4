"""GET /v1/model-versions and POST /v1/model-versions/{v}/activate (rollback / roll forward)."""

from __future__ import annotations

from fastapi import APIRouter, Path

from service.db.session import write_lock
from service.deps import AdminDep, SessionDep, SettingsDep
from service.errors import NotFound
from service.repositories import audit, model_versions
from service.schemas import ModelVersionList, ModelVersionOut
from service.serving_events import announce_version

router = APIRouter(prefix="/v1/model-versions", tags=["model-versions"])


def _base_version(settings, active: int) -> ModelVersionOut:  # noqa: ANN001
    return ModelVersionOut(
        version=0, parent_version=None, created_at=None, base_model=settings.model, layer_kind=None, request_ids=[],
        files={}, metrics_summary={}, active=active == 0,
    )


@router.get("", response_model=ModelVersionList)
def list_model_versions(session: SessionDep, settings: SettingsDep, principal: AdminDep) -> ModelVersionList:
    """Version 0 is the base model; version N fuses the layers of every request listed in it."""
    active = model_versions.active_version(session)
    rows = [_base_version(settings, active)] + [
        ModelVersionOut(
            version=v.version, parent_version=v.parent_version, created_at=v.created_at, base_model=v.base_model,
            layer_kind=v.layer_kind, request_ids=list(v.request_ids), files=dict(v.files),
            metrics_summary=dict(v.metrics_summary), active=v.version == active,
        )
        for v in model_versions.list_versions(session)
    ]
    return ModelVersionList(data=rows, active_version=active)


@router.post("/{version}/activate", response_model=ModelVersionList)
def activate_model_version(
    version: int = Path(ge=0, le=10_000_000), *, session: SessionDep, settings: SettingsDep, principal: AdminDep,
) -> ModelVersionList:
    """Serve another version (rollback or roll forward). New requests still fuse onto the latest version.

    Serving a version older than the latest re-exposes what the later requests removed; the audit event
    lists those requests (`reexposed_request_ids`)."""
    write_lock(session)
    if version != 0 and model_versions.get_version(session, version) is None:
        raise NotFound(f"model version {version} not found", param="version")
    previous = model_versions.active_version(session)
    model_versions.set_active_version(session, version)
    audit.append_event(
        session, "version.activated",
        {"version": version, "previous_version": previous,
         "reexposed_request_ids": model_versions.requests_not_in(session, version)},
        actor=principal.key_id, tenant=principal.tenant,
    )
    session.commit()
    announce_version(settings, version)
    return list_model_versions(session, settings, principal)
