"""GET /v1/model-versions and POST /v1/model-versions/{v}/activate (rollback / roll forward)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from service.api.deps import AdminDep, SessionDep, SettingsDep
from service.api.schemas import ModelVersionList, ModelVersionOut
from service.domain import versions
from service.domain.events import announce_version
from service.domain.repositories import model_versions

router = APIRouter(prefix="/v1/model-versions", tags=["model-versions"])

VersionNumber = Annotated[int, Path(ge=0, le=10_000_000)]  # also the console's version pages


def _base_version(settings, active: int) -> ModelVersionOut:
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
    version: VersionNumber, session: SessionDep, settings: SettingsDep, principal: AdminDep,
) -> ModelVersionList:
    """Serve another version (rollback or roll forward); new requests are then fused onto it, so a rollback
    sticks (a new request's version has `parent_version` = the active one and never brings back what the
    rollback removed).

    Moving to a version without some of the active version's requests re-exposes what they removed; the
    audit event lists those requests (`reexposed_request_ids`)."""
    versions.activate(session, principal, version)
    session.commit()
    announce_version(settings, version)
    return list_model_versions(session, settings, principal)
