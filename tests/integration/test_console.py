"""The web console (/console) against the real app, database and Redis (no worker): sign-in with an API key
kept in an HttpOnly, SameSite=Strict cookie, CSRF tokens on every action, and the JSON API's role and tenant
rules on every page. In a real browser (headless Chromium): test_console_browser.py."""

from __future__ import annotations

import json
import re

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.domain.audit.offline import verify_export
from service.domain.db.models import AuditEvent, DeletionRequest, ForgetPayload, Job
from service.domain.db.session import session_scope
from service.domain.repositories import api_keys, model_versions

pytestmark = pytest.mark.integration

BODY = {"subject_ref": "case-1042", "reason": "gdpr_art17",
        "forget": [{"text": "Jane Roe lives at 12 Elm Street and her phone number is 555-0199."}]}
FORM = {"subject_ref": "case-2001", "reason": "gdpr_art17",
        "forget": "Jane Roe lives at 12 Elm Street.\nWhere does Jane Roe live? => 12 Elm Street", "retain": "",
        "method": ""}


def plaintext(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def sign_in(client: TestClient, headers: dict[str, str]) -> None:
    response = client.post("/console/sign-in", data={"api_key": plaintext(headers)}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console"


def csrf(client: TestClient, page: str = "/console") -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', client.get(page).text)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def row_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m)) for m in
                (DeletionRequest, ForgetPayload, Job, AuditEvent)}


@pytest.fixture
def second_client(api):
    """Another browser on the same app (its own cookie jar)."""
    with TestClient(api.app, raise_server_exceptions=False) as client:
        yield client


# ---------------------------------------------------------------- sign-in


@pytest.mark.parametrize("key", ["ul_000000000000_wrong", "not a key at all", ""])
def test_a_wrong_key_cannot_sign_in(api, key):
    response = api.post("/console/sign-in", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "invalid or revoked API key" in response.text
    assert 'for="api_key"' in response.text  # the form again, labelled


def test_a_sign_in_posted_from_another_site_is_refused(api, make_key):
    response = api.post("/console/sign-in", data={"api_key": plaintext(make_key())},
                        headers={"Origin": "https://attacker.example"}, follow_redirects=False)

    assert response.status_code == 403 and "set-cookie" not in response.headers


def test_a_revoked_key_cannot_sign_in(api, make_key):
    headers = make_key()
    with session_scope(api.settings.db_url) as session:
        key = api_keys.authenticate(session, plaintext(headers))
        api_keys.revoke_key(session, key)
        session.commit()
    response = api.post("/console/sign-in", data={"api_key": plaintext(headers)}, follow_redirects=False)
    assert response.status_code == 401 and "set-cookie" not in response.headers


def test_the_cookie_is_httponly_samesite_strict_and_the_key_is_in_no_url_or_page(api, make_key):
    headers = make_key()
    response = api.post("/console/sign-in", data={"api_key": plaintext(headers)}, follow_redirects=False)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert "secure" not in cookie  # plain http (TestClient); over https see the next test
    assert plaintext(headers) not in response.headers["location"]
    page = api.get("/console")
    assert page.status_code == 200 and "case-" not in page.text
    assert plaintext(headers) not in page.text and plaintext(headers) not in str(page.url)
    assert page.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in page.headers[
        "content-security-policy"]


def test_the_cookie_is_secure_over_https(api, make_key):
    response = api.post("https://testserver/console/sign-in", data={"api_key": plaintext(make_key())},
                        follow_redirects=False)
    assert "secure" in response.headers["set-cookie"].lower()


@pytest.mark.parametrize("path", ["/console", "/console/requests/new", "/console/audit", "/console/versions",
                                  "/console/requests/00000000-0000-0000-0000-000000000000"])
def test_pages_without_a_cookie_redirect_to_sign_in(api, path):
    response = api.get(path, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/sign-in"


def test_a_cookie_of_a_revoked_key_is_signed_out(api, make_key):
    headers = make_key()
    sign_in(api, headers)
    with session_scope(api.settings.db_url) as session:
        api_keys.revoke_key(session, api_keys.authenticate(session, plaintext(headers)))
        session.commit()
    response = api.get("/console", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/sign-in"


def test_sign_out_clears_the_cookie(api, make_key):
    sign_in(api, make_key())
    response = api.post("/console/sign-out", data={"csrf_token": csrf(api)}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/sign-in"
    assert 'unlearn_console=""' in response.headers["set-cookie"] or "max-age=0" in response.headers[
        "set-cookie"].lower()
    assert api.get("/console", follow_redirects=False).status_code == 303


def test_the_stylesheet_is_served_by_the_service(api):
    response = api.get("/console/static/console.css")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------- requests: tenant rules


def test_a_requester_sees_own_tenant_requests_only(api, make_key, second_client):
    api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "acme-case"}, headers=make_key(tenant="acme"))
    api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "globex-case"}, headers=make_key(tenant="globex"))
    sign_in(second_client, make_key(tenant="acme"))
    page = second_client.get("/console").text
    assert "acme-case" in page and "globex-case" not in page
    assert "queued" in page


def test_pages_with_a_running_job_refresh_themselves_and_stop_when_it_ends(api, make_key):
    headers = make_key()
    created = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    sign_in(api, headers)
    refresh = '<meta http-equiv="refresh" content="3">'
    assert refresh in api.get("/console").text and refresh in api.get(f"/console/requests/{created['id']}").text

    with session_scope(api.settings.db_url) as session:
        session.get(Job, created["job"]["id"]).status = "succeeded"
        session.commit()

    assert refresh not in api.get("/console").text and refresh not in api.get(f"/console/requests/{created['id']}").text


def test_another_tenants_request_is_404_like_the_api(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme")).json()
    sign_in(api, make_key(tenant="globex"))
    response = api.get(f"/console/requests/{created['id']}")
    assert response.status_code == 404
    assert f"deletion request {created['id']} not found" in response.text
    assert "case-1042" not in response.text


def test_the_request_page_shows_status_progress_and_timings(api, make_key):
    headers = make_key()
    created = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    sign_in(api, headers)
    page = api.get(f"/console/requests/{created['id']}").text
    assert created["id"] in page and "queued" in page and "Timings" in page
    assert "555-0199" not in page  # the forget text is never shown back
    assert "shown to auditor keys" in page  # a requester does not read the audit log (as in the JSON API)


def test_the_request_page_shows_the_verdict_checks_and_the_evidence_before_and_after(api, make_key):
    headers = make_key()
    created = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    with session_scope(api.settings.db_url) as session:  # as a finished job leaves them (no worker here)
        job = session.get(Job, created["job"]["id"])
        job.metrics = {"before": {"forget": {"nll": 1.5, "rougeL": 0.9}, "general": {"ppl": 20.0}},
                       "after": {"forget": {"nll": 3.0, "rougeL": 0.1}, "general": {"ppl": 21.0}}}
        job.verdict = {"passed": False, "reasons": ["general_ppl_increase = 0.05, required <= 0.01"],
                       "thresholds": {}, "checks": {
                           "forget_nll_ratio": {"value": 2.0, "limit": 1.25, "ok": True},
                           "general_ppl_increase": {"value": 0.05, "limit": 0.01, "ok": False},
                           "neighbour_rougeL_drop": None}}
        job.model_version = 3
        session.commit()
    sign_in(api, headers)
    page = api.get(f"/console/requests/{created['id']}").text
    rows = [" ".join(re.sub(r"<[^>]+>", " ", row).split()) for row in re.findall(r"<tr>.*?</tr>", page, re.S)]
    assert "forget_nll_ratio 2 1.25 pass" in rows and "general_ppl_increase 0.05 0.01 fail" in rows
    assert "forget nll 1.5 3" in rows and "general ppl 20 21" in rows
    assert "required &lt;= 0.01" in page and "neighbour_rougeL_drop" not in page
    assert re.search(r"<dt>Model version</dt><dd>3</dd>", page)


def test_the_request_page_plots_the_forget_and_general_metrics_before_and_after(api, make_key):
    headers = make_key()
    created = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    with session_scope(api.settings.db_url) as session:
        job = session.get(Job, created["job"]["id"])
        job.metrics = {"before": {"forget": {"nll": 1.5}, "general": {"ppl": 20.0}},
                       "after": {"forget": {"nll": 3.0}, "general": {"ppl": 21.0}}}
        session.commit()
    sign_in(api, headers)
    page = api.get(f"/console/requests/{created['id']}").text

    labels = re.findall(r'<svg[^>]*role="img"\s+aria-label="([^"]+)"', page)
    assert labels == ["forget set: answer NLL (higher = forgotten): before 1.5, after 3",
                      "general text: perplexity (should stay): before 20, after 21"]
    # one scale per row: the larger value fills the 300-unit bar
    assert '<rect x="0" y="2" width="150.0"' in page and '<rect x="0" y="19" width="300.0"' in page


def test_an_auditor_sees_the_requests_audit_events(api, make_key):
    created = api.post("/v1/deletion-requests", json=BODY, headers=make_key()).json()
    sign_in(api, make_key(role="auditor"))
    page = api.get(f"/console/requests/{created['id']}").text
    assert "request.received" in page


def test_the_list_is_paginated_like_the_api(api, make_key):
    headers = make_key()
    for i in range(3):
        api.post("/v1/deletion-requests", json={**BODY, "subject_ref": f"s-{i}"}, headers=headers)
    sign_in(api, headers)
    first = api.get("/console?limit=2").text
    assert "s-2" in first and "s-1" in first and "s-0" not in first and "offset=2" in first
    assert "s-0" in api.get("/console?limit=2&offset=2").text
    assert api.get("/console?limit=201").status_code == 422  # the API's bound (le=200)


# ---------------------------------------------------------------- submit through the form


def test_the_form_submits_a_request_and_enqueues_its_job(api, make_key):
    sign_in(api, make_key())
    response = api.post("/console/requests", data={**FORM, "csrf_token": csrf(api, "/console/requests/new")},
                        follow_redirects=False)
    assert response.status_code == 303
    request_id = response.headers["location"].rsplit("/", 1)[1]
    with session_scope(api.settings.db_url) as session:
        request = session.get(DeletionRequest, request_id)
        assert request.subject_ref == "case-2001" and request.n_forget == 2 and request.tenant == "acme"
        payload = session.get(ForgetPayload, request_id).forget
        job = session.scalars(select(Job).where(Job.request_id == request_id)).one()
    assert payload == [{"text": "Jane Roe lives at 12 Elm Street."},
                       {"prompt": "Where does Jane Roe live?", "answer": "12 Elm Street"}]
    messages = redis.Redis.from_url(api.settings.redis_url).lrange("gpu", 0, -1)
    assert len(messages) == 1 and job.id in messages[0].decode()
    assert "case-2001" in api.get(response.headers["location"]).text


def test_a_double_submitted_form_is_one_request(api, make_key):
    sign_in(api, make_key())
    form = {**FORM, "csrf_token": csrf(api, "/console/requests/new"), "idempotency_key": "a" * 32}
    first = api.post("/console/requests", data=form, follow_redirects=False)
    second = api.post("/console/requests", data=form, follow_redirects=False)
    assert first.headers["location"] == second.headers["location"]
    assert row_counts(api.settings.db_url)["jobs"] == 1


@pytest.mark.parametrize(("change", "param", "shown"), [
    ({"subject_ref": "x" * 201}, "subject_ref", "max_length 200"),
    ({"forget": ""}, "forget", "min_length 1"),
    ({"reason": "because"}, "reason", "gdpr_art17"),
    ({"forget": "Where does Jane live? => "}, "forget.0.answer", "min_length 1"),
])
def test_a_validation_error_shows_the_field_and_limit_and_writes_nothing(api, make_key, change, param, shown):
    sign_in(api, make_key())
    before = row_counts(api.settings.db_url)
    form = {**FORM, **change, "csrf_token": csrf(api, "/console/requests/new")}
    response = api.post("/console/requests", data=form, follow_redirects=False)
    assert response.status_code == 422
    assert f"<strong>{param}</strong>" in response.text and shown in response.text
    assert 'aria-invalid="true"' in response.text
    assert row_counts(api.settings.db_url) == before
    assert redis.Redis.from_url(api.settings.redis_url).llen("gpu") == 0


def test_a_limit_error_keeps_the_apis_status_and_message(api, make_key):
    sign_in(api, make_key())
    form = {**FORM, "forget": "\n".join(["z"] * 300), "csrf_token": csrf(api, "/console/requests/new")}
    response = api.post("/console/requests", data=form, follow_redirects=False)
    assert response.status_code == 413
    assert "UNLEARN_MAX_FORGET_ITEMS" in response.text and "limit: 256" in response.text


@pytest.mark.parametrize("token", [None, "0" * 64])
def test_a_post_without_the_right_csrf_token_is_403(api, make_key, token):
    sign_in(api, make_key())
    form = dict(FORM) if token is None else {**FORM, "csrf_token": token}
    response = api.post("/console/requests", data=form, follow_redirects=False)
    assert response.status_code == 403 and "CSRF" in response.text
    assert row_counts(api.settings.db_url)["deletion_requests"] == 0


def test_the_csrf_token_of_one_session_does_not_work_in_another(api, make_key, second_client):
    sign_in(api, make_key())
    sign_in(second_client, make_key())
    response = second_client.post("/console/requests", data={**FORM, "csrf_token": csrf(api)},
                                  follow_redirects=False)
    assert response.status_code == 403


def test_an_auditor_cannot_submit(api, make_key):
    sign_in(api, make_key(role="auditor"))
    assert api.get("/console/requests/new").status_code == 403
    response = api.post("/console/requests", data={**FORM, "csrf_token": csrf(api, "/console/audit")})
    assert response.status_code == 403 and row_counts(api.settings.db_url)["deletion_requests"] == 0


# ---------------------------------------------------------------- audit and versions: role rules


def test_an_auditor_sees_the_audit_log_with_the_chain_status(api, make_key):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme"))
    api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "globex-case"}, headers=make_key(tenant="globex"))
    sign_in(api, make_key(role="auditor", tenant="acme"))
    response = api.get("/console/audit")
    assert response.status_code == 200
    assert "Chain valid: 2 events" in response.text
    assert "request.received" in response.text and "globex-case" not in response.text
    assert "555-0199" not in response.text
    assert "no signed checkpoint yet" in response.text


def test_the_audit_log_filters_by_type_and_paginates(api, make_key):
    headers = make_key()
    for i in range(3):
        api.post("/v1/deletion-requests", json={**BODY, "subject_ref": f"s-{i}"}, headers=headers)
    sign_in(api, make_key(role="auditor"))
    first = api.get("/console/audit?limit=2").text
    assert "cursor=2" in first
    assert api.get("/console/audit?type=request.received").text.count("<td>request.received</td>") == 3
    assert "No events match." in api.get("/console/audit?type=job.cancelled").text


@pytest.mark.parametrize("path", ["/console/audit", "/console/versions", "/console/versions/0/activate"])
def test_a_requester_gets_403_on_audit_and_versions(api, make_key, path):
    sign_in(api, make_key())
    response = api.get(path)
    assert response.status_code == 403 and "may not do this" in response.text


def test_an_auditor_downloads_its_tenant_export_that_verifies_offline(api, make_key, tmp_path):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme"))
    api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "globex-case"}, headers=make_key(tenant="globex"))
    sign_in(api, make_key(role="auditor", tenant="acme"))
    page = api.get("/console/audit").text
    assert "/console/audit/export" in page and "every other" in page
    response = api.post("/console/audit/export", data={"csrf_token": csrf(api, "/console/audit")})
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    assert "globex" not in response.text
    export = tmp_path / "audit.jsonl"
    export.write_bytes(response.content)
    result = verify_export(export)
    assert result.valid and result.length == 2 and result.redacted == 1 and result.checkpoints == 1


def test_the_export_needs_the_csrf_token(api, make_key):
    sign_in(api, make_key(role="auditor"))
    assert api.post("/console/audit/export", data={}).status_code == 403


def test_an_admin_downloads_the_export_that_verifies_offline(api, make_key, tmp_path):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    sign_in(api, make_key(role="admin", tenant="ops"))
    assert "/console/audit/export" in api.get("/console/audit").text
    response = api.post("/console/audit/export", data={"csrf_token": csrf(api, "/console/audit")})
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    export = tmp_path / "audit.jsonl"
    export.write_bytes(response.content)
    result = verify_export(export)
    assert result.valid and result.length == 1 and result.checkpoints == 1
    assert json.loads(response.content.splitlines()[0])["kind"] == "header"


def test_an_admin_sees_versions_and_activates_after_the_re_exposure_warning(api, make_key, two_versions):
    sign_in(api, make_key(role="admin", tenant="ops"))
    listing = api.get("/console/versions").text
    assert "Serving version" in listing and "/console/versions/1/activate" in listing
    confirm = api.get("/console/versions/1/activate")
    assert confirm.status_code == 200 and "re-exposes" in confirm.text and "r2" in confirm.text
    token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', confirm.text).group(1)
    response = api.post("/console/versions/1/activate", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/console/versions"
    with session_scope(api.settings.db_url) as session:
        assert model_versions.active_version(session) == 1


def test_activating_without_the_csrf_token_changes_nothing(api, make_key, two_versions):
    sign_in(api, make_key(role="admin", tenant="ops"))
    assert api.post("/console/versions/1/activate", data={}).status_code == 403
    with session_scope(api.settings.db_url) as session:
        assert model_versions.active_version(session) == 2


def test_an_unknown_version_is_404(api, make_key, two_versions):
    sign_in(api, make_key(role="admin", tenant="ops"))
    assert api.get("/console/versions/7/activate").status_code == 404
    assert api.post("/console/versions/7/activate", data={"csrf_token": csrf(api)}).status_code == 404
