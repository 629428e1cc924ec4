"""Fixtures shared by the integration tests (the app, keys and services come from tests/conftest.py)."""

from __future__ import annotations

import pytest

from service.domain.db.models import ModelVersion
from service.domain.db.session import session_scope
from service.domain.repositories import model_versions


@pytest.fixture
def two_versions(api) -> None:
    """Version 1 fused request r1; version 2 fused r1 and r2 (rows only: activation reads no files)."""
    with session_scope(api.settings.db_url) as session:
        for version, requests in ((1, ["r1"]), (2, ["r1", "r2"])):
            model_versions.add_version(session, ModelVersion(
                version=version, parent_version=version - 1, base_model="tiny", base_sha256="0" * 64,
                layer_kind="bottleneck", path=f"/nowhere/{version}", manifest_sha256="0" * 64, files={},
                request_ids=requests, metrics_summary={},
            ))
        model_versions.set_active_version(session, 2)
        session.commit()
