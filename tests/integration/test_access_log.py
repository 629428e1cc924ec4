"""structlog JSON access logs: one line per request with a request id (echoed or generated), never a request
body or the Authorization header."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from service.domain.logging import configure_logging

pytestmark = pytest.mark.integration

SECRET_TEXT = "Maria Example's diagnosis is code Z-8812-QX"
BODY = {"subject_ref": "case-55", "reason": "gdpr_art17", "forget": [{"text": SECRET_TEXT}]}


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(stream=stream)
    yield stream
    structlog.reset_defaults()


def access_lines(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "http.request"]


def test_log_holds_neither_the_forget_text_nor_the_key(api, make_key, log_output):
    headers = make_key()
    token = headers["Authorization"].removeprefix("Bearer ")
    assert api.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202
    bad = {**BODY, "forget": [{"text": SECRET_TEXT, "tenant": "x"}]}  # a 422 must not echo the input either
    rejected = api.post("/v1/deletion-requests", json=bad, headers=headers)
    assert rejected.status_code == 422 and SECRET_TEXT not in rejected.text
    output = log_output.getvalue()
    assert len(access_lines(log_output)) == 2
    for secret in (SECRET_TEXT, "Z-8812-QX", token, token[:12], "Bearer", "authorization"):
        assert secret.lower() not in output.lower()


def test_access_line_names_request_status_and_key_id(api, make_key, log_output):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    [line] = access_lines(log_output)
    assert line["method"] == "POST" and line["path"] == "/v1/deletion-requests" and line["status"] == 202
    assert line["key_id"] and line["level"] == "info" and line["duration_ms"] >= 0
    assert len(line["request_id"]) == 32


def test_client_request_id_is_echoed_and_logged(api, make_key, log_output):
    response = api.get("/v1/deletion-requests", headers={**make_key(), "X-Request-ID": "trace-abc.123"})
    assert response.headers["X-Request-ID"] == "trace-abc.123"
    assert access_lines(log_output)[0]["request_id"] == "trace-abc.123"


@pytest.mark.parametrize("given", [None, "has spaces", "x" * 200, "<script>"])
def test_missing_or_unsafe_request_id_is_replaced_by_a_fresh_one(api, log_output, given):
    headers = {} if given is None else {"X-Request-ID": given}
    first = api.get("/healthz", headers=headers).headers["X-Request-ID"]
    second = api.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert first != second and len(first) == 32 and given not in (first, second)


def test_query_string_is_not_logged(api, make_key, log_output):
    api.get("/v1/deletion-requests?subject_ref=case-secret-ref", headers=make_key())
    assert "case-secret-ref" not in log_output.getvalue()
    assert access_lines(log_output)[0]["path"] == "/v1/deletion-requests"


def test_refused_requests_are_logged_with_their_request_id(api, log_output):
    response = api.get("/v1/jobs/x")
    assert response.status_code == 401
    [line] = access_lines(log_output)
    assert line["status"] == 401 and line["request_id"] == response.headers["X-Request-ID"] and line["key_id"] is None
