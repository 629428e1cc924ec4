"""Limits on the real app, database and Redis: per-key rate limits (429 + Retry-After, shared by every API
process through Redis), the per-tenant cap on active jobs, body size (413, chunked too), items and text length."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.api.app import create_app
from service.domain.db.models import AuditEvent, DeletionRequest, ForgetPayload, Job
from service.domain.db.session import session_scope
from service.domain.repositories import api_keys

pytestmark = pytest.mark.integration

BODY = {"subject_ref": "case-9", "reason": "gdpr_art17", "forget": [{"text": "John Doe's badge number is 4471."}]}
COMPLETION = {"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}]}


def row_counts(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {m.__tablename__: session.scalar(select(func.count()).select_from(m))
                for m in (DeletionRequest, ForgetPayload, Job, AuditEvent)}


def away_from_window_edge(period: int = 3600, margin: float = 5.0) -> None:
    """Fixed windows: do not start a burst in the last seconds of one (the next would reset the count)."""
    left = period - time.time() % period
    if left < margin:
        time.sleep(left + 0.1)


@pytest.fixture
def limited(make_settings, db_url: str, redis_url: str):
    """Factory: a TestClient on an app with the given limit settings (same db and Redis each call)."""
    clients: list[TestClient] = []

    def build(**limits: object) -> TestClient:
        settings = make_settings(database_url=db_url, redis_url=redis_url, **limits)
        client = TestClient(create_app(settings), raise_server_exceptions=False).__enter__()
        client.settings = settings  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def key(db_url: str, role: str = "requester", tenant: str = "acme") -> dict[str, str]:
    with session_scope(db_url) as session:
        _key, plaintext = api_keys.create_key(session, role, tenant)
        session.commit()
    return {"Authorization": f"Bearer {plaintext}"}


# ------------------------------------------------------------------ rate limits


def assert_rate_limited(response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["Retry-After"]) <= 3600


def test_submissions_over_the_keys_rate_get_429_with_retry_after(limited, db_url):
    api = limited(rate_limit_requests="2/hour")
    headers = key(db_url)
    away_from_window_edge()
    assert [api.post("/v1/deletion-requests", json=BODY, headers=headers).status_code for _ in range(2)] == [202, 202]
    before = row_counts(db_url)
    assert_rate_limited(api.post("/v1/deletion-requests", json=BODY, headers=headers))
    assert row_counts(db_url) == before


def test_rate_limit_is_per_key(limited, db_url):
    api = limited(rate_limit_requests="1/hour")
    away_from_window_edge()
    first, second = key(db_url), key(db_url)
    assert api.post("/v1/deletion-requests", json=BODY, headers=first).status_code == 202
    assert_rate_limited(api.post("/v1/deletion-requests", json=BODY, headers=first))
    assert api.post("/v1/deletion-requests", json=BODY, headers=second).status_code == 202


def test_rate_limit_is_shared_by_api_processes_through_redis(limited, db_url):
    one, two = limited(rate_limit_requests="2/hour"), limited(rate_limit_requests="2/hour")
    headers = key(db_url)
    away_from_window_edge()
    assert one.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202
    assert two.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202
    assert_rate_limited(one.post("/v1/deletion-requests", json=BODY, headers=headers))


def test_reads_are_not_counted_against_the_submission_rate(limited, db_url):
    api = limited(rate_limit_requests="1/hour")
    headers = key(db_url)
    away_from_window_edge()
    for _ in range(3):
        assert api.get("/v1/deletion-requests", headers=headers).status_code == 200
    assert api.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202


def test_inference_rate_covers_completions_and_chat_together(limited, db_url):
    api = limited(rate_limit_inference="2/hour")
    headers = key(db_url, "inference")
    away_from_window_edge()
    # this app serves no model: requests within the rate reach the route and get 503
    assert api.post("/v1/completions", json=COMPLETION, headers=headers).status_code == 503
    assert api.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 503
    assert_rate_limited(api.post("/v1/completions", json=COMPLETION, headers=headers))
    assert_rate_limited(api.post("/v1/chat/completions", json=CHAT, headers=headers))


def test_unknown_key_gets_401_before_any_rate_count(limited, db_url):
    api = limited(rate_limit_requests="1/hour")
    away_from_window_edge()
    assert api.post("/v1/deletion-requests", json=BODY, headers=key(db_url)).status_code == 202
    assert api.post("/v1/deletion-requests", json=BODY, headers={"Authorization": "Bearer nope"}).status_code == 401


# ------------------------------------------------------------------ concurrent jobs per tenant


def test_tenant_over_its_active_job_cap_gets_429(limited, db_url):
    api = limited(max_active_jobs_per_tenant=2)
    headers = key(db_url)
    ids = [api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"] for _ in range(2)]
    before = row_counts(db_url)
    refused = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_active_jobs"
    assert refused.headers["Retry-After"] == "60"
    assert row_counts(db_url) == before
    assert api.post("/v1/jobs/" + ids[0] + "/cancel", headers=headers).status_code == 202
    assert api.post("/v1/deletion-requests", json=BODY, headers=headers).status_code == 202  # a slot freed


def test_job_cap_is_per_tenant(limited, db_url):
    api = limited(max_active_jobs_per_tenant=1)
    assert api.post("/v1/deletion-requests", json=BODY, headers=key(db_url, tenant="acme")).status_code == 202
    assert api.post("/v1/deletion-requests", json=BODY, headers=key(db_url, tenant="acme")).status_code == 429
    assert api.post("/v1/deletion-requests", json=BODY, headers=key(db_url, tenant="globex")).status_code == 202


def test_idempotent_replay_is_answered_even_at_the_cap(limited, db_url):
    api = limited(max_active_jobs_per_tenant=1)
    headers = {**key(db_url), "Idempotency-Key": "case-9-a"}
    first = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    replay = api.post("/v1/deletion-requests", json=BODY, headers=headers)
    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"]


# ------------------------------------------------------------------ body size, items, text length


def test_body_over_the_limit_with_content_length_gets_413(limited, db_url):
    api = limited(max_body_bytes=4096)
    before = row_counts(db_url)
    big = {**BODY, "forget": [{"text": "x" * 5000}]}
    response = api.post("/v1/deletion-requests", json=big, headers=key(db_url))
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert row_counts(db_url) == before


def chunks(payload: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start:start + size]


def test_chunked_body_over_the_limit_gets_413(limited, db_url):
    import json

    api = limited(max_body_bytes=4096)
    payload = json.dumps({**BODY, "forget": [{"text": "x" * 20000}]}).encode()
    before = row_counts(db_url)
    headers = {**key(db_url), "Content-Type": "application/json"}
    response = api.post("/v1/deletion-requests", content=chunks(payload), headers=headers)  # no Content-Length
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert row_counts(db_url) == before


def test_chunked_body_under_the_limit_is_accepted(limited, db_url):
    import json

    api = limited(max_body_bytes=4096)
    headers = {**key(db_url), "Content-Type": "application/json"}
    response = api.post("/v1/deletion-requests", content=chunks(json.dumps(BODY).encode(), 16), headers=headers)
    assert response.status_code == 202, response.text


def test_too_many_forget_items_get_413_naming_the_setting(limited, db_url):
    api = limited(max_forget_items=3)
    body = {**BODY, "forget": [{"text": f"fact {i}"} for i in range(4)]}
    response = api.post("/v1/deletion-requests", json=body, headers=key(db_url))
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_many_items" and "UNLEARN_MAX_FORGET_ITEMS" in error["message"]


def test_item_over_the_text_length_gets_413(limited, db_url):
    api = limited(max_item_chars=100)
    body = {**BODY, "forget": [{"prompt": "q" * 60, "answer": "a" * 60}]}
    response = api.post("/v1/deletion-requests", json=body, headers=key(db_url))
    assert response.status_code == 413 and response.json()["error"]["code"] == "item_too_large"


def test_bad_rate_setting_is_refused_at_start(make_settings):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="rate_limit_requests"):
        make_settings(rate_limit_requests="lots")


@pytest.mark.parametrize("content", ['{"question": "Q"}\nnot json\n', '{"answer": "no prompt"}\n', '["Q", "A"]\n'])
def test_a_malformed_retain_corpus_is_refused_at_start_naming_the_line(make_settings, tmp_path, content):
    from pydantic import ValidationError

    corpus = tmp_path / "retain.jsonl"
    corpus.write_text(content)
    with pytest.raises(ValidationError, match="retain corpus .* line"):
        make_settings(retain_corpus=corpus)


def test_a_missing_retain_corpus_is_refused_at_start(make_settings, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a readable file"):
        make_settings(retain_corpus=tmp_path / "absent.jsonl")
