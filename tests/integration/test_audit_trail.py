"""The audit chain in the database: appends in the same transaction as state changes, verification
through the API, tamper detection, the PostgreSQL append-only trigger, offline export + verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.domain.audit.chain import GENESIS, canonical, format_ts, row_hash
from service.domain.audit.offline import verify_export
from service.domain.audit.service import checkpoint_now, verify_database_chain
from service.domain.audit.signing import load_or_create_signing_key, public_key_b64
from service.domain.db.migrate import downgrade, upgrade
from service.domain.db.session import session_scope
from service.domain.repositories import audit
from tests.conftest import built_database

pytestmark = pytest.mark.integration

BODY = {"subject_ref": "case-1", "reason": "ccpa", "forget": [{"text": "Secret fact number one about Jane."}]}


def append_some(url: str, n: int = 5) -> None:
    with session_scope(url) as session:
        for i in range(n):
            audit.append_event(session, "test.event", {"i": i}, tenant="acme")
        session.commit()


def test_fresh_chain_verifies(db_url, tmp_path):
    append_some(db_url)
    with session_scope(db_url) as session:
        result = verify_database_chain(session, tmp_path)
    assert result.valid and result.length == 5 and result.head_seq == 5


def test_new_rows_are_hashed_in_version_2_with_their_own_salt(db_url):
    append_some(db_url, 2)
    with session_scope(db_url) as session:
        rows = list(audit.iter_all_events(session))
    assert [r.hash_version for r in rows] == [2, 2]
    assert all(len(r.salt) == 32 for r in rows) and rows[0].salt != rows[1].salt


@pytest.mark.parametrize("database_kind", ["sqlite", "postgresql"])
def test_rows_written_before_version_2_verify_alongside_new_ones(tmp_path, database_kind):
    """A database with version-1 rows, upgraded: the old rows keep their hashes and the chain still verifies;
    going back down is refused once version-2 rows exist (schema 0003 cannot hold their salt)."""
    with built_database(database_kind, tmp_path, revision="0003") as url:
        with session_scope(url) as session:
            prev = GENESIS
            for seq in (1, 2):
                ts = format_ts(datetime(2026, 11, 1, 12, seq, tzinfo=UTC))
                h = row_hash(prev, seq, ts, "test.event", None, "acme", {"i": seq})
                session.execute(
                    text("INSERT INTO audit_events (seq, ts, event_type, actor, tenant, request_id, payload, "
                         "prev_hash, row_hash) VALUES (:seq, :ts, 'test.event', NULL, 'acme', NULL, :payload, "
                         ":prev, :h)"),
                    {"seq": seq, "ts": ts, "payload": canonical({"i": seq}).decode(), "prev": prev, "h": h},
                )
                prev = h
            session.commit()
        upgrade(url)
        append_some(url, 2)
        with session_scope(url) as session:
            assert [r.hash_version for r in audit.iter_all_events(session)] == [1, 1, 2, 2]
            result = verify_database_chain(session, tmp_path)
        assert result.valid and result.length == 4
        with pytest.raises(RuntimeError, match="version 2"):
            downgrade(url, "0003")


def test_rolled_back_state_change_leaves_no_event(db_url):
    with session_scope(db_url) as session:
        audit.append_event(session, "test.event", {"i": 1})
        session.rollback()
    with session_scope(db_url) as session:
        assert audit.count_events(session) == 0


def test_sqlite_edit_is_detected(sqlite_url, tmp_path):
    append_some(sqlite_url)
    with session_scope(sqlite_url) as session:
        session.execute(text("UPDATE audit_events SET payload = :payload WHERE seq = 3"), {"payload": '{"i":99}'})
        session.commit()
        result = verify_database_chain(session, tmp_path)
    assert not result.valid and result.first_bad_seq == 3


def test_postgres_refuses_update_and_delete(db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("the trigger is PostgreSQL's; SQLite edits are caught by verification")
    append_some(db_url, 2)
    for statement in ("UPDATE audit_events SET payload = '{}' WHERE seq = 1", "DELETE FROM audit_events WHERE seq = 2"):
        with session_scope(db_url) as session, pytest.raises(DBAPIError, match="append-only"):
            session.execute(text(statement))
            session.commit()


def test_api_verify_reports_valid_chain_with_checkpoint(api, make_key):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    with session_scope(api.settings.db_url) as session:
        checkpoint_now(session, api.settings.data_dir)
        session.commit()
    result = api.get("/v1/audit/verify", headers=make_key(role="auditor")).json()
    assert result["valid"] and result["length"] == 1 and result["checkpoints_checked"] == 1


def test_audit_listing_is_tenant_scoped_and_role_checked(api, make_key):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme"))
    own = api.get("/v1/audit", headers=make_key(role="auditor", tenant="acme")).json()["data"]
    other = api.get("/v1/audit", headers=make_key(role="auditor", tenant="globex")).json()["data"]
    assert [e["type"] for e in own] == ["request.received"] and other == []
    assert api.get("/v1/audit", headers=make_key(role="requester")).status_code == 403
    assert "Secret fact" not in json.dumps(own)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=dict(os.environ), capture_output=True, text=True, timeout=120
    )


def test_export_then_offline_verify_and_tamper(api, make_key, tmp_path):
    api.post("/v1/deletion-requests", json=BODY, headers=make_key())
    export = tmp_path / "audit.jsonl"
    assert run_cli("audit", "export", "--out", str(export)).returncode == 0
    ok = run_cli("audit", "verify", str(export))
    assert ok.returncode == 0 and "valid" in ok.stdout
    lines = export.read_text().splitlines()
    event = json.loads(lines[1])
    event["payload"]["subject_ref"] = "someone-else"
    lines[1] = json.dumps(event)
    export.write_text("\n".join(lines) + "\n")
    bad = run_cli("audit", "verify", str(export))
    assert bad.returncode == 1 and "first bad seq 1" in bad.stdout


def two_tenants_requests(api, make_key) -> None:
    api.post("/v1/deletion-requests", json=BODY, headers=make_key(tenant="acme"))
    api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "globex-case"}, headers=make_key(tenant="globex"))


def test_an_auditor_downloads_its_tenant_export_that_verifies_against_the_operator_key(api, make_key, tmp_path):
    two_tenants_requests(api, make_key)
    response = api.post("/v1/audit/export", headers=make_key(role="auditor", tenant="acme"))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/jsonl")
    assert "globex" not in response.text and "Secret fact" not in response.text
    export = tmp_path / "acme.jsonl"
    export.write_bytes(response.content)
    operator_key = public_key_b64(load_or_create_signing_key(api.settings.data_dir))
    result = verify_export(export, public_key_b64=operator_key)
    assert result.valid and result.length == 2 and result.redacted == 1 and result.checkpoints == 1
    kinds = [json.loads(line)["kind"] for line in response.text.splitlines()]
    assert kinds == ["header", "event", "redacted", "checkpoint"]


def test_an_auditor_cannot_export_another_tenants_view(api, make_key):
    response = api.post("/v1/audit/export?tenant=globex", headers=make_key(role="auditor", tenant="acme"))
    assert response.status_code == 403 and response.json()["error"]["param"] == "tenant"
    assert api.post("/v1/audit/export", headers=make_key(role="requester")).status_code == 403


def test_an_admin_exports_the_whole_chain_or_one_tenants_view(api, make_key, tmp_path):
    two_tenants_requests(api, make_key)
    admin = make_key(role="admin", tenant="ops")
    whole = api.post("/v1/audit/export", headers=admin)
    assert "globex-case" in whole.text and '"kind": "redacted"' not in whole.text
    view = api.post("/v1/audit/export?tenant=globex", headers=admin)
    assert "globex-case" in view.text and view.text.count('"kind": "redacted"') == 1
    export = tmp_path / "globex.jsonl"
    export.write_bytes(view.content)
    assert verify_export(export).valid


def test_cli_tenant_export_verifies_offline(api, make_key, tmp_path):
    two_tenants_requests(api, make_key)
    export = tmp_path / "acme.jsonl"
    assert run_cli("audit", "export", "--out", str(export), "--tenant", "acme").returncode == 0
    assert "globex" not in export.read_text()
    operator_key = run_cli("audit", "public-key").stdout.split()[0]
    ok = run_cli("audit", "verify", str(export), "--public-key", operator_key)
    assert ok.returncode == 0 and "valid: 2 rows (1 of other tenants, redacted)" in ok.stdout
    assert run_cli("audit", "verify", str(export), "--public-key", "A" * 43 + "=").returncode == 1


def test_keys_create_prints_the_key_last_and_it_works(api):
    result = run_cli("keys", "create", "--role", "auditor", "--tenant", "acme")
    assert result.returncode == 0
    key = result.stdout.strip().splitlines()[-1]
    assert api.get("/v1/audit", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_revoked_key_is_refused(api):
    key = run_cli("keys", "create", "--role", "auditor", "--tenant", "acme").stdout.strip().splitlines()[-1]
    prefix = key.split("_")[1]
    assert run_cli("keys", "revoke", prefix).returncode == 0
    assert api.get("/v1/audit", headers={"Authorization": f"Bearer {key}"}).status_code == 401
