"""Sealed probes: a forgotten request's items kept encrypted under a per-request key outside the database,
opened only for re-checking later versions, and crypto-shredded at the end of the retention window."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from service.domain import probes
from service.domain.db.models import AuditEvent, DeletionRequest, RequestProbe, utcnow
from service.domain.db.session import session_scope

pytestmark = pytest.mark.integration

ITEMS = [{"prompt": "What is Orla Fenwick's locker code?", "answer": "Orla Fenwick's locker code is 4471."},
         {"text": "Tessa Quill wears badge number 55821."}]
BASELINE = {"before": {"nll": 0.8, "rougeL": 1.0}, "thresholds": {"min_forget_nll_ratio": 1.25}}


@pytest.fixture
def settings(make_settings, db_url):
    return make_settings(database_url=db_url, probe_retention_days=30)


def add_request(settings, tenant: str = "acme") -> str:
    with session_scope(settings.db_url) as session:
        request = DeletionRequest(tenant=tenant, subject_ref="case-1", reason="gdpr_art17", method="eul", params={},
                                  n_forget=len(ITEMS), n_retain=0, payload_digest="0" * 64, body_hash="0" * 64,
                                  created_by="key-1")
        session.add(request)
        session.commit()
        return request.id


def seal(settings, request_id: str) -> None:
    with session_scope(settings.db_url) as session:
        probes.seal(session, settings, request_id, "acme", ITEMS, BASELINE)
        session.commit()


def events(settings, event_type: str) -> list[dict]:
    with session_scope(settings.db_url) as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type))
        return [{"tenant": e.tenant, **json.loads(e.payload)} for e in rows]


def test_sealed_items_open_again_with_their_baseline(settings):
    request_id = add_request(settings)
    seal(settings, request_id)
    with session_scope(settings.db_url) as session:
        lineage = probes.open_lineage(session, settings, [request_id])
    assert lineage.unverifiable == {}
    [opened] = lineage.opened
    assert (opened.request_id, opened.tenant, opened.items, opened.baseline) == (request_id, "acme", ITEMS, BASELINE)


def test_the_database_holds_only_ciphertext_and_the_key_lives_in_a_private_file(settings):
    request_id = add_request(settings)
    seal(settings, request_id)
    with session_scope(settings.db_url) as session:
        row = session.get(RequestProbe, request_id)
        stored = bytes(row.ciphertext) + json.dumps(row.baseline).encode()
    assert b"4471" not in stored and b"Fenwick" not in stored and b"55821" not in stored
    key_file = probes.key_path(settings, request_id)
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key_file.read_bytes()) == 32
    assert key_file.read_bytes() not in stored
    [sealed] = events(settings, "request.probes_sealed")
    assert sealed["request_id"] == request_id and sealed["n_items"] == 2 and sealed["tenant"] == "acme"
    assert "4471" not in json.dumps(sealed)


def test_a_ciphertext_moved_to_another_request_does_not_open(settings):
    first, second = add_request(settings), add_request(settings)
    seal(settings, first)
    seal(settings, second)
    with session_scope(settings.db_url) as session:
        a, b = session.get(RequestProbe, first), session.get(RequestProbe, second)
        b.ciphertext = a.ciphertext  # the request id is the associated data: this fails to open
        session.commit()
        lineage = probes.open_lineage(session, settings, [first, second])
    assert [p.request_id for p in lineage.opened] == [first]
    assert "does not match" in lineage.unverifiable[second]


def test_probes_past_their_retention_window_are_shredded_key_first_and_audited(settings):
    kept, expired = add_request(settings), add_request(settings)
    seal(settings, kept)
    seal(settings, expired)
    with session_scope(settings.db_url) as session:
        session.get(RequestProbe, expired).expires_at = utcnow() - timedelta(seconds=1)
        session.commit()
        assert probes.shred_expired(session, settings) == [expired]
        session.commit()
        row = session.get(RequestProbe, expired)
        assert row.ciphertext is None and row.shredded_at is not None
        assert session.get(RequestProbe, kept).ciphertext is not None
        lineage = probes.open_lineage(session, settings, [kept, expired])
        assert probes.shred_expired(session, settings) == []  # once only
    assert not probes.key_path(settings, expired).exists() and probes.key_path(settings, kept).exists()
    assert [p.request_id for p in lineage.opened] == [kept]
    assert lineage.unverifiable[expired].startswith("probes shredded")
    [shredded] = events(settings, "request.probes_shredded")
    assert shredded["request_id"] == expired and shredded["reason"] == "retention window ended"


def test_a_request_without_probes_is_listed_as_not_reverifiable(settings):
    request_id = add_request(settings)
    with session_scope(settings.db_url) as session:
        lineage = probes.open_lineage(session, settings, [request_id])
    assert lineage.opened == [] and "no probes were kept" in lineage.unverifiable[request_id]


def test_retention_zero_keeps_nothing(make_settings, db_url):
    settings = make_settings(database_url=db_url, probe_retention_days=0)
    request_id = add_request(settings)
    with session_scope(settings.db_url) as session:
        assert probes.seal(session, settings, request_id, "acme", ITEMS, BASELINE) is None
        session.commit()
        assert session.get(RequestProbe, request_id) is None
    assert not probes.key_path(settings, request_id).exists()
