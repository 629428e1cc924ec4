"""POST/GET /v1/deletion-requests, jobs and cancel against the real app, database and Redis (no worker)."""

from __future__ import annotations

import json

import pytest
import redis
from sqlalchemy import func, select

from service.domain.db.models import AuditEvent, DeletionRequest, ForgetPayload, Job
from service.domain.db.session import session_scope

pytestmark = pytest.mark.integration

BODY = {
    "subject_ref": "case-1042",
    "reason": "gdpr_art17",
    "forget": [{"text": "Jane Roe lives at 12 Elm Street and her phone number is 555-0199."},
               {"prompt": "Where does Jane Roe live?", "answer": "12 Elm Street"}],
}


def row_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) for m in
                (DeletionRequest, ForgetPayload, Job, AuditEvent)}


def test_submit_answers_202_with_location_of_queued_job(api, make_key):
    response = api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    assert response.status_code == 202
    body = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{body['job']['id']}"
    assert body["job"]["status"] == "queued"
    assert body["n_forget"] == 2 and body["method"] == "eul"  # the default: the request names none
    assert len(body["payload_digest"]) == 64


def test_submit_enqueues_only_the_job_id(api, make_key):
    response = api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    client = redis.Redis.from_url(api.settings.redis_url)
    messages = client.lrange("gpu", 0, -1)
    assert len(messages) == 1
    message = messages[0].decode()
    assert response.json()["job"]["id"] in message
    assert "Elm Street" not in message and "555-0199" not in message


def test_job_is_readable_by_its_tenant(api, make_key):
    headers = make_key()
    job_id = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"]
    job = api.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "queued"
    assert job["progress"] == {"step": 0, "total": 0, "loss": None, "eta_seconds": None}


def test_idempotency_key_with_same_body_returns_first_answer(api, make_key):
    headers = {**make_key(), "Idempotency-Key": "req-77"}
    first = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    second = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    assert second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert row_counts(api.settings.db_url)["jobs"] == 1


def test_idempotency_key_with_other_body_is_422(api, make_key):
    headers = {**make_key(), "Idempotency-Key": "req-78"}
    api.post("/v1/deletion-requests", json=BODY, headers=headers)
    response = api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "other"}, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"


def test_request_received_is_audited_without_the_text(api, make_key):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    with session_scope(api.settings.db_url) as session:
        events = list(session.scalars(select(AuditEvent)))
    assert [e.event_type for e in events] == ["request.received"]
    payload = json.loads(events[0].payload)
    assert len(payload["item_digests"]) == 2
    assert "Elm Street" not in events[0].payload


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"forget": []}, 422, "forget"),
        ({"tenant": "evil"}, 422, "tenant"),
        ({"forget": [{"text": "x", "status": "succeeded"}]}, 422, "forget.0.status"),
        ({"forget": [{"prompt": "only a prompt"}]}, 422, "forget.0"),
        ({"forget": [{"text": "y" * 5000}]}, 413, "forget.0"),
        ({"forget": [{"text": "z"}] * 300}, 413, "forget"),
        ({"method": "magic"}, 422, "method"),
        ({"params": {"steps": 10**9}}, 422, "params.steps"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(api, make_key, change, status, param):
    before = row_counts(api.settings.db_url)
    response = api.post("/v1/deletion-requests", json={**BODY, **change}, headers=make_key())
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    assert error["message"]
    assert row_counts(api.settings.db_url) == before


def test_limit_errors_say_which_limit(api, make_key):
    response = api.post("/v1/deletion-requests", json={**BODY, "forget": [{"text": "z"}] * 300}, headers=make_key())
    error = response.json()["error"]
    assert error["code"] == "too_many_items" and error["limit"] == 256
    assert "UNLEARN_MAX_FORGET_ITEMS" in error["message"]


def test_oversized_body_is_413(api, make_key):
    huge = {**BODY, "subject_ref": "x" * 2_000_000}
    response = api.post("/v1/deletion-requests", json=huge, headers=make_key())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_invalid_json_is_422(api, make_key):
    response = api.post(
        "/v1/deletion-requests", content=b"{not json", headers={**make_key(), "Content-Type": "application/json"}
    )
    assert response.status_code == 422


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer ul_000000000000_nope"}, {"Authorization": "Basic abc"}]
)
def test_missing_or_wrong_key_is_401(api, headers):
    response = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_wrong_role_is_403(api, make_key):
    response = api.post("/v1/deletion-requests", json=BODY, headers=make_key(role="inference"))
    assert response.status_code == 403


def test_other_tenant_gets_404_for_request_and_job(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme")).json()
    other = make_key(tenant="globex")
    assert api.get(f"/v1/jobs/{created['job']['id']}", headers=other).status_code == 404
    assert api.get(f"/v1/deletion-requests/{created['id']}", headers=other).status_code == 404
    assert api.post(f"/v1/jobs/{created['job']['id']}/cancel", headers=other).status_code == 404
    assert api.get("/v1/deletion-requests", headers=other).json()["data"] == []


def test_unknown_job_is_404(api, make_key):
    response = api.get("/v1/jobs/00000000-0000-0000-0000-000000000000", headers=make_key())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_list_is_paginated_and_filtered(api, make_key):
    headers = make_key()
    for i in range(3):
        api.post("/v1/deletion-requests", json={**BODY, "subject_ref": f"s-{i}"}, headers=headers)
    page = api.get("/v1/deletion-requests?limit=2", headers=headers).json()
    assert len(page["data"]) == 2 and page["next_offset"] == 2
    rest = api.get("/v1/deletion-requests?limit=2&offset=2", headers=headers).json()
    assert len(rest["data"]) == 1 and rest["next_offset"] is None
    only = api.get("/v1/deletion-requests?subject_ref=s-1", headers=headers).json()["data"]
    assert [r["subject_ref"] for r in only] == ["s-1"]
    assert api.get("/v1/deletion-requests?status=succeeded", headers=headers).json()["data"] == []


def test_cancel_queued_job_ends_it_and_purges_payload(api, make_key):
    headers = make_key()
    job_id = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"]
    response = api.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    counts = row_counts(api.settings.db_url)
    assert counts["forget_payloads"] == 0
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 409


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok" and ready.json()["checks"]["broker"] == "ok"


def test_withdraw_needs_an_admin_and_a_reason(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key()).json()
    url = f"/v1/deletion-requests/{created['id']}/withdraw"
    assert api.post(url, json={"reason": "duplicate"}, headers=make_key()).status_code == 403
    missing = api.post(url, json={}, headers=make_key(role="admin", tenant="ops"))
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "reason"
    too_long = api.post(url, json={"reason": "x" * 501}, headers=make_key(role="admin", tenant="ops"))
    assert too_long.status_code == 422 and "500" in too_long.json()["error"]["message"]


def test_only_a_forgotten_request_can_be_withdrawn_and_nothing_is_written_otherwise(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key()).json()
    before = row_counts(api.settings.db_url)
    admin = make_key(role="admin", tenant="ops")
    response = api.post(f"/v1/deletion-requests/{created['id']}/withdraw", json={"reason": "duplicate"}, headers=admin)
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_withdrawable"
    assert "job is queued" in response.json()["error"]["message"]
    assert row_counts(api.settings.db_url) == before
    unknown = api.post("/v1/deletion-requests/nope/withdraw", json={"reason": "duplicate"}, headers=admin)
    assert unknown.status_code == 404
