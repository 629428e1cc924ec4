"""Model versions and which one is served."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.domain.db.models import ModelVersion, ServingState, utcnow


def latest_version_number(session: Session) -> int:
    return session.scalar(select(func.max(ModelVersion.version))) or 0


def get_version(session: Session, version: int) -> ModelVersion | None:
    return session.get(ModelVersion, version)


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.version)))


def requests_not_in(session: Session, version: int, than: int) -> list[str]:
    """Ids of requests fused into version `than` but not into `version`: what moving from `than` to
    `version` re-exposes."""
    source = get_version(session, than) if than else None
    target = get_version(session, version) if version else None
    kept = set(target.request_ids) if target is not None else set()
    return [rid for rid in (source.request_ids if source is not None else []) if rid not in kept]


def add_version(session: Session, version: ModelVersion) -> ModelVersion:
    session.add(version)
    session.flush()  # the primary key makes a second publisher of the same number fail here
    return version


def active_version(session: Session) -> int:
    state = session.get(ServingState, 1)
    return 0 if state is None else state.active_version


def set_active_version(session: Session, version: int) -> None:
    state = session.get(ServingState, 1)
    if state is None:
        session.add(ServingState(id=1, active_version=version, updated_at=utcnow()))
    else:
        state.active_version = version
        state.updated_at = utcnow()
    session.flush()
