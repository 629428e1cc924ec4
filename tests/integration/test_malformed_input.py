"""Malformed input on the real app, database (SQLite and PostgreSQL) and Redis: invalid JSON, invalid UTF-8,
huge numbers, NUL characters. Each gets a clear 4xx in the service's error shape, writes nothing, and the
next valid request still succeeds."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from service.domain.db.models import AuditEvent, DeletionRequest, ForgetPayload, Job
from service.domain.db.session import session_scope

pytestmark = pytest.mark.integration

BODY = {"subject_ref": "case-3", "reason": "gdpr_art17", "forget": [{"text": "Ann Example's PIN is 0000."}]}
JSON = {"Content-Type": "application/json"}


def row_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m))
                for m in (DeletionRequest, ForgetPayload, Job, AuditEvent)}


def assert_clear_4xx(response, status: int = 422) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    return error


@pytest.fixture
def submit(api, make_key):
    """POST raw bytes; check nothing was written and that a valid submission still works afterwards."""
    headers = {**make_key(), **JSON}

    def post(raw: bytes, status: int = 422) -> dict:
        before = row_counts(api.settings.db_url)
        error = assert_clear_4xx(api.post("/v1/deletion-requests", content=raw, headers=headers), status)
        assert row_counts(api.settings.db_url) == before
        assert api.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202
        return error

    return post


@pytest.mark.parametrize("raw", [b'{"subject_ref": ', b"not json", b"", b"[]", b"null", b'"text"',
                                 b'{"subject_ref": "a",}', b"\xef\xbb\xbf{}"])
def test_invalid_json_gets_422(submit, raw):
    submit(raw)


@pytest.mark.parametrize("raw", [
    b'{"subject_ref": "\xff\xfe", "reason": "other", "forget": [{"text": "a"}]}',
    b'{"subject_ref": "case", "reason": "other", "forget": [{"text": "\xc3\x28"}]}',
    b'{"subject_ref": "\xed\xa0\x80", "reason": "other", "forget": [{"text": "a"}]}',  # encoded surrogate
])
def test_invalid_utf8_gets_422(submit, raw):
    submit(raw)


def test_lone_surrogate_escape_gets_422(submit):
    error = submit(b'{"subject_ref": "case", "reason": "other", "forget": [{"text": "\\ud800"}]}')
    assert "surrogate" in error["message"] or "UTF" in error["message"] or "forget" in error["message"]


@pytest.mark.parametrize("params", [
    b'{"steps": 1e309}', b'{"steps": 10000000000000000000000000000000000000000}', b'{"lr": 1e309}',
    b'{"lr": -1e309}', b'{"lr": NaN}', b'{"lr": Infinity}', b'{"seed": 10000000000000000000000000000000000000000}',
    b'{"thresholds": {"min_forget_nll_ratio": 1e309}}', b'{"thresholds": {"min_forget_nll_ratio": NaN}}',
    b'{"steps": 1.5}', b'{"steps": "3"}', b'{"relearn_check": "yes"}',
])
def test_huge_or_non_finite_numbers_get_422(submit, params):
    raw = b'{"subject_ref": "case", "reason": "other", "forget": [{"text": "a b"}], "params": ' + params + b"}"
    error = submit(raw)
    assert error["param"].startswith("params")


@pytest.mark.parametrize("field,value", [
    ("subject_ref", "case\u0000-1"), ("forget", [{"text": "a\u0000b"}]),
    ("forget", [{"prompt": "q\u0000", "answer": "a"}]),
    ("retain", [{"text": "\u0000"}]), ("params", {"thresholds": {"forget\u0000": 1.0}}),
])
def test_nul_characters_in_the_body_get_422(api, make_key, submit, field, value):
    import json

    error = submit(json.dumps({**BODY, field: value}).encode())
    assert "NUL" in error["message"]


@pytest.mark.parametrize("path", [
    "/v1/deletion-requests?subject_ref=a%00b", "/v1/audit?type=x%00", "/v1/audit?subject_ref=%00",
    "/v1/audit?request_id=%00", "/v1/jobs/a%00b", "/v1/deletion-requests/%00", "/v1/jobs/%00/cancel",
])
def test_nul_characters_in_the_path_or_query_get_422(api, make_key, path):
    headers = make_key("admin", "ops")
    method = "POST" if path.endswith("/cancel") else "GET"
    before = row_counts(api.settings.db_url)
    error = assert_clear_4xx(api.request(method, path, headers=headers))
    assert "NUL" in error["message"]
    assert row_counts(api.settings.db_url) == before
    assert api.get("/v1/deletion-requests", headers=headers).status_code == 200


@pytest.mark.parametrize("raw", [b'{"model": "m", "prompt": "a", "max_tokens": 1e309}',
                                 b'{"model": "m", "prompt": "a", "temperature": NaN}',
                                 b'{"model": "m", "prompt": "a", "n": 10000000000000000000000000000000000000000}',
                                 b'{"model": "m", "prompt": "\xff"}', b'{"model": "m", "prompt": '])
def test_malformed_completion_requests_get_422(api, make_key, raw):
    headers = {**make_key("inference"), **JSON}
    assert_clear_4xx(api.post("/v1/completions", content=raw, headers=headers))


def test_wrong_content_type_gets_422_not_500(api, make_key):
    before = row_counts(api.settings.db_url)
    response = api.post("/v1/deletion-requests", content=b"subject_ref=a", headers={
        **make_key(), "Content-Type": "application/x-www-form-urlencoded"})
    assert_clear_4xx(response)
    assert row_counts(api.settings.db_url) == before
