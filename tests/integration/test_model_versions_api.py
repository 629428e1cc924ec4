"""Rollback through the API: activating an older version is audited with the requests it re-exposes."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from service.domain.db.models import AuditEvent
from service.domain.db.session import session_scope

pytestmark = pytest.mark.integration


def last_activation(db_url: str) -> dict:
    with session_scope(db_url) as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "version.activated")
                                .order_by(AuditEvent.seq.desc())).first()
        return json.loads(event.payload)


@pytest.mark.parametrize("version,reexposed", [(2, []), (1, ["r2"]), (0, ["r1", "r2"])])
def test_activation_audits_the_requests_it_re_exposes(api, make_key, two_versions, version, reexposed):
    response = api.post(f"/v1/model-versions/{version}/activate", headers=make_key(role="admin", tenant="ops"))
    assert response.status_code == 200 and response.json()["active_version"] == version
    assert last_activation(api.settings.db_url) == {
        "version": version, "previous_version": 2, "reexposed_request_ids": reexposed}


def test_activating_an_unknown_version_is_404_and_changes_nothing(api, make_key, two_versions):
    response = api.post("/v1/model-versions/7/activate", headers=make_key(role="admin", tenant="ops"))
    assert response.status_code == 404 and response.json()["error"]["param"] == "version"
    assert api.get("/v1/model-versions", headers=make_key(role="admin", tenant="ops")).json()["active_version"] == 2
