"""The audit chain in the database: appends in the same transaction as state changes, verification
through the API, tamper detection, the PostgreSQL append-only trigger, offline export + verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.domain.audit.service import checkpoint_now, verify_database_chain
from service.domain.db.session import session_scope
from service.domain.repositories import audit

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
