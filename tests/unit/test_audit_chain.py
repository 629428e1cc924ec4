"""Audit chain, digests, signatures and the offline export: tampering is detected, intact chains pass."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone

import pytest

from service.domain.audit.chain import (
    GENESIS,
    body_hash,
    canonical,
    compute_row_hash,
    format_ts,
    link_hash,
    redact,
    row_hash,
    verify_against_checkpoints,
    verify_events,
)
from service.domain.audit.digest import forget_digests, item_digest, load_or_create_hmac_key, payload_digest
from service.domain.audit.offline import export_header, export_lines, read_export, verify_export, write_export
from service.domain.audit.signing import (
    load_or_create_signing_key,
    public_key_b64,
    sign_head,
    verify_checkpoint,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def build_chain(n: int, start_prev: str = GENESIS, salt: str = "") -> list[dict]:
    events, prev = [], start_prev
    for seq in range(1, n + 1):
        ts = format_ts(T0 + timedelta(seconds=seq))
        payload = {"job": f"job-{seq}{salt}", "step": seq, "score": 0.5}
        h = row_hash(prev, seq, ts, "job.progress", "key-1", "acme", payload)
        events.append(
            {
                "seq": seq,
                "ts": ts,
                "type": "job.progress",
                "actor": "key-1",
                "tenant": "acme",
                "payload": payload,
                "prev_hash": prev,
                "row_hash": h,
            }
        )
        prev = h
    return events


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory):
    return load_or_create_signing_key(tmp_path_factory.mktemp("data"))


# --- canonical form and hashing -----------------------------------------------------------------


def test_canonical_is_rfc8785_sorted_and_compact():
    assert canonical({"b": 1, "a": [1.0, "é", None]}) == '{"a":[1,"é",null],"b":1}'.encode()


def test_format_ts_is_utc_with_microseconds_and_z():
    moment = datetime(2024, 5, 1, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(moment) == "2024-05-01T12:00:00.000005Z"
    assert format_ts(datetime(2024, 5, 1, 12, 0, 0)) == "2024-05-01T12:00:00.000000Z"  # naive = UTC


def test_row_hash_is_sha256_of_prev_bytes_and_canonical_fields():
    import hashlib

    fields = {"seq": 1, "ts": "t", "type": "x", "actor": None, "tenant": "a", "payload": {"k": 1}}
    expected = hashlib.sha256(bytes(32) + canonical(fields)).hexdigest()
    assert row_hash(GENESIS, 1, "t", "x", None, "a", {"k": 1}) == expected


# --- the chain alone ----------------------------------------------------------------------------


def test_intact_chain_verifies_with_its_head():
    events = build_chain(5)
    result = verify_events(events)
    assert result.valid and result.length == 5
    assert (result.head_seq, result.head_hash) == (5, events[-1]["row_hash"])
    assert result.first_bad_seq is None and result.reason is None


def test_empty_chain_is_valid_at_genesis():
    result = verify_events([])
    assert result.valid and result.length == 0 and result.head_hash == GENESIS


def test_payload_stored_as_canonical_text_verifies_like_the_dict():
    events = build_chain(3)
    for event in events:
        event["payload"] = canonical(event["payload"]).decode()
    assert verify_events(events).valid


def test_edited_payload_is_caught_at_its_row():
    events = build_chain(5)
    events[2]["payload"]["step"] = 99
    result = verify_events(events)
    assert not result.valid and result.first_bad_seq == 3 and "edited" in result.reason
    assert result.head_seq == 2


def test_edited_payload_with_recomputed_hash_breaks_the_next_link():
    events = build_chain(5)
    e = events[2]
    e["payload"]["step"] = 99
    e["row_hash"] = row_hash(e["prev_hash"], 3, e["ts"], e["type"], e["actor"], e["tenant"], e["payload"])
    result = verify_events(events)
    assert not result.valid and result.first_bad_seq == 4 and "prev_hash" in result.reason


@pytest.mark.parametrize(
    "field,value",
    [("tenant", "evil"), ("actor", "key-2"), ("type", "job.failed"), ("ts", "2030-01-01T00:00:00.000000Z")],
)
def test_every_hashed_field_is_protected(field, value):
    events = build_chain(3)
    events[1][field] = value
    assert verify_events(events).first_bad_seq == 2


def test_deleted_row_is_caught_as_a_seq_gap():
    events = build_chain(5)
    del events[2]
    result = verify_events(events)
    assert not result.valid and result.first_bad_seq == 3 and "missing" in result.reason
    assert result.length == 4


def test_deleted_first_row_is_caught():
    assert verify_events(build_chain(3)[1:]).first_bad_seq == 1


def test_swapped_rows_are_caught():
    events = build_chain(5)
    events[1], events[2] = events[2], events[1]
    result = verify_events(events)
    assert not result.valid and result.first_bad_seq == 2


def test_swapped_contents_with_renumbered_seq_are_caught():
    events = build_chain(5)
    events[1], events[2] = events[2], events[1]
    events[1]["seq"], events[2]["seq"] = 2, 3
    assert verify_events(events).first_bad_seq == 2


def test_wrong_prev_link_is_caught():
    events = build_chain(4)
    events[3]["prev_hash"] = events[1]["row_hash"]
    result = verify_events(events)
    assert result.first_bad_seq == 4 and "prev_hash" in result.reason


def test_duplicated_row_is_caught():
    events = build_chain(3)
    events.insert(2, copy.deepcopy(events[1]))
    assert verify_events(events).first_bad_seq == 3


# --- signed checkpoints -------------------------------------------------------------------------


def test_sign_head_round_trips_and_binds_seq_and_hash(signing_key):
    cp = sign_head(signing_key, 7, "ab" * 32)
    pub = public_key_b64(signing_key)
    assert cp["public_key_b64"] == pub and len(cp["key_id"]) == 16
    assert verify_checkpoint(cp, pub)
    assert not verify_checkpoint({**cp, "seq": 8}, pub)
    assert not verify_checkpoint({**cp, "row_hash": "cd" * 32}, pub)
    db_row = {"seq": 7, "row_hash": "ab" * 32, "signature": cp["signature_b64"]}
    assert verify_checkpoint(db_row, pub)


def test_checkpoint_from_another_key_is_refused(signing_key, tmp_path):
    other = load_or_create_signing_key(tmp_path)
    cp = sign_head(other, 1, "ab" * 32)
    assert not verify_checkpoint(cp, public_key_b64(signing_key))


def test_intact_chain_matches_its_checkpoints(signing_key):
    events = build_chain(10)
    cps = [sign_head(signing_key, s, events[s - 1]["row_hash"]) for s in (4, 8)]
    result = verify_against_checkpoints(verify_events(events), events, cps, public_key_b64(signing_key))
    assert result.valid and result.checkpoints == 2 and result.head_seq == 10


def test_truncated_tail_after_a_checkpoint_is_caught(signing_key):
    events = build_chain(10)
    cps = [sign_head(signing_key, 8, events[7]["row_hash"])]
    cut = events[:6]
    chain_only = verify_events(cut)
    assert chain_only.valid  # a cut tail is a perfectly good shorter chain...
    result = verify_against_checkpoints(chain_only, cut, cps, public_key_b64(signing_key))
    assert not result.valid and result.first_bad_seq == 7 and "truncated" in result.reason  # ...until signed


def test_consistently_rewritten_chain_is_caught_only_by_the_checkpoint(signing_key):
    events = build_chain(10)
    cps = [sign_head(signing_key, 4, events[3]["row_hash"]), sign_head(signing_key, 9, events[8]["row_hash"])]
    forged = events[:5] + build_chain(10, salt="-forged")[5:]
    prev = forged[4]["row_hash"]
    for e in forged[5:]:  # relink the forged tail so the chain itself is flawless
        e["prev_hash"] = prev
        e["row_hash"] = prev = row_hash(
            prev, e["seq"], e["ts"], e["type"], e["actor"], e["tenant"], e["payload"]
        )
    chain_only = verify_events(forged)
    assert chain_only.valid
    result = verify_against_checkpoints(chain_only, forged, cps, public_key_b64(signing_key))
    assert not result.valid and "rewritten" in result.reason
    assert result.first_bad_seq == 5 and result.head_seq == 4 and result.checkpoints == 1


def test_forged_checkpoint_signature_is_caught(signing_key, tmp_path):
    events = build_chain(4)
    forged_cp = sign_head(load_or_create_signing_key(tmp_path), 4, events[3]["row_hash"])
    result = verify_against_checkpoints(
        verify_events(events), events, [forged_cp], public_key_b64(signing_key)
    )
    assert not result.valid and "signature" in result.reason


def test_earlier_chain_break_wins_over_later_checkpoint(signing_key):
    events = build_chain(6)
    cps = [sign_head(signing_key, 6, events[5]["row_hash"])]
    del events[1]
    result = verify_against_checkpoints(verify_events(events), events, cps, public_key_b64(signing_key))
    assert result.first_bad_seq == 2 and "missing" in result.reason


# --- keys and digests ---------------------------------------------------------------------------


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_signing_key_is_created_once_with_mode_0600(tmp_path):
    first = load_or_create_signing_key(tmp_path)
    second = load_or_create_signing_key(tmp_path)
    assert public_key_b64(first) == public_key_b64(second)
    assert _mode(tmp_path / "keys" / "audit_ed25519.pem") == 0o600


def test_hmac_key_file_is_32_random_bytes_0600_and_stable(tmp_path):
    key = load_or_create_hmac_key(tmp_path)
    assert len(key) == 32 and load_or_create_hmac_key(tmp_path) == key
    assert _mode(tmp_path / "keys" / "hmac.key") == 0o600


def test_hmac_env_value_wins_over_the_file(tmp_path):
    load_or_create_hmac_key(tmp_path)
    assert load_or_create_hmac_key(tmp_path, "11" * 32) == bytes([0x11]) * 32


@pytest.mark.parametrize("bad", ["not-hex", "abcd"])
def test_bad_hmac_env_value_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="UNLEARN_HMAC_KEY"):
        load_or_create_hmac_key(tmp_path, bad)


def test_item_digest_is_hmac_sha256_of_canonical_json():
    import hashlib
    import hmac

    item = {"prompt": "Who?", "answer": "Her."}
    expected = hmac.new(b"k" * 32, b'{"answer":"Her.","prompt":"Who?"}', hashlib.sha256).hexdigest()
    assert item_digest(b"k" * 32, item) == expected
    assert item_digest(b"j" * 32, item) != expected  # keyed


def test_payload_digest_depends_on_every_item_and_order():
    a, b = {"text": "one"}, {"text": "two"}
    key = b"k" * 32
    assert payload_digest(key, [a, b]) != payload_digest(key, [b, a])
    assert payload_digest(key, [a, b]) != payload_digest(key, [a])


def test_forget_digests_hold_no_text():
    record = forget_digests(b"k" * 32, [{"text": "secret address 12 Elm St"}])
    assert record["count"] == 1 and len(record["item_digests"]) == 1
    assert "Elm" not in json.dumps(record)


# --- offline export -----------------------------------------------------------------------------


def _write(path, events, cps, key):
    write_export(path, export_lines(events, cps, public_key_b64(key)))


def test_export_round_trips_and_verifies_offline(signing_key, tmp_path):
    events = build_chain(6)
    cps = [sign_head(signing_key, 6, events[5]["row_hash"])]
    path = tmp_path / "audit.jsonl"
    _write(path, events, cps, signing_key)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {
        "kind": "header",
        "format": "unlearn-audit/2",
        "public_key": public_key_b64(signing_key),
        "key_id": sign_head(signing_key, 1, GENESIS)["key_id"],
        "scope": "all",
    }
    assert export_header(signing_key, scope="all") == first
    assert len(read_export(path).events) == 6
    result = verify_export(path, public_key_b64=public_key_b64(signing_key))
    assert result.valid and result.head_seq == 6 and result.checkpoints == 1


def test_export_with_an_edited_line_fails_with_the_seq(signing_key, tmp_path):
    events = build_chain(6)
    path = tmp_path / "audit.jsonl"
    _write(path, events, [sign_head(signing_key, 6, events[5]["row_hash"])], signing_key)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"step": 3', '"step": 4')
    path.write_text("\n".join(lines) + "\n")
    result = verify_export(path)
    assert not result.valid and result.first_bad_seq == 3


def test_export_re_signed_with_another_key_fails_when_the_key_is_pinned(signing_key, tmp_path):
    forger = load_or_create_signing_key(tmp_path)
    events = build_chain(3, salt="-forged")
    path = tmp_path / "audit.jsonl"
    _write(path, events, [sign_head(forger, 3, events[2]["row_hash"])], forger)
    assert verify_export(path).valid  # self-consistent with its own header key
    assert not verify_export(path, public_key_b64=public_key_b64(signing_key)).valid


@pytest.mark.parametrize(
    "content",
    ["", "not json\n", '{"kind": "event", "seq": 1}\n', '{"kind": "header", "format": "other/9"}\n'],
)
def test_malformed_export_is_an_invalid_result(tmp_path, content):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    result = verify_export(path)
    assert not result.valid and result.reason.startswith("unreadable export")


def test_signature_is_base64_of_64_bytes(signing_key):
    cp = sign_head(signing_key, 1, GENESIS)
    assert len(base64.b64decode(cp["signature_b64"])) == 64


# --- hash version 2 and tenant exports with redacted rows ---------------------------------------


def build_chain_v2(tenants: list[str], events: list[dict] | None = None) -> list[dict]:
    """Version-2 rows, one per entry of `tenants`, appended to `events` (e.g. a version-1 chain)."""
    events = [dict(e) for e in events or []]
    prev = events[-1]["row_hash"] if events else GENESIS
    for tenant in tenants:
        seq = len(events) + 1
        row = {"seq": seq, "ts": format_ts(T0 + timedelta(seconds=seq)), "type": "request.received",
               "actor": f"key-{tenant}", "tenant": tenant, "request_id": f"req-{tenant}-{seq}",
               "payload": {"subject_ref": f"{tenant}-subject-{seq}"}, "prev_hash": prev,
               "hash_version": 2, "salt": f"{seq:032x}"}
        row["row_hash"] = prev = compute_row_hash(row, prev)
        events.append(row)
    return events


def test_v2_row_hash_links_prev_to_the_salted_body_hash():
    (row,) = build_chain_v2(["acme"])
    body = {"seq": 1, "ts": row["ts"], "type": "request.received", "actor": "key-acme", "tenant": "acme",
            "payload": row["payload"], "hash_version": 2, "salt": row["salt"]}
    inner = hashlib.sha256(canonical(body)).hexdigest()
    assert body_hash(1, row["ts"], "request.received", "key-acme", "acme", row["payload"], row["salt"]) == inner
    assert row["row_hash"] == hashlib.sha256(bytes.fromhex(GENESIS) + bytes.fromhex(inner)).hexdigest()
    assert link_hash(GENESIS, inner) == row["row_hash"]


def test_v2_chain_verifies_and_protects_the_salt():
    events = build_chain_v2(["acme", "globex", "acme"])
    assert verify_events(events).valid
    events[1]["salt"] = "f" * 32
    result = verify_events(events)
    assert not result.valid and result.first_bad_seq == 2


def test_a_chain_upgraded_from_v1_to_v2_verifies():
    events = build_chain_v2(["acme", "globex"], events=build_chain(3))
    result = verify_events(events)
    assert result.valid and result.head_seq == 5


def test_a_redacted_v2_row_keeps_its_link_and_shows_no_content():
    row = build_chain_v2(["globex"])[0]
    shown = redact(row)
    assert set(shown) == {"seq", "hash_version", "redacted", "prev_hash", "row_hash", "body_hash"}
    assert link_hash(shown["prev_hash"], shown["body_hash"]) == row["row_hash"]
    assert verify_events([shown]).valid


def _tenant_export(path, events, key, tenant, checkpoint_seq=None):
    seq = checkpoint_seq or len(events)
    cps = [sign_head(key, seq, events[seq - 1]["row_hash"])]
    write_export(path, export_lines(events, cps, public_key_b64(key), tenant=tenant))
    return path


def test_a_tenant_export_verifies_and_holds_nothing_of_other_tenants(signing_key, tmp_path):
    events = build_chain_v2(["acme", "globex", "acme", "globex", "initech"])
    path = _tenant_export(tmp_path / "acme.jsonl", events, signing_key, "acme")
    text = path.read_text()
    assert "globex" not in text and "initech" not in text
    assert json.loads(text.splitlines()[0])["scope"] == {"tenant": "acme"}
    result = verify_export(path, public_key_b64=public_key_b64(signing_key))
    assert result.valid and result.length == 5 and result.redacted == 3 and result.checkpoints == 1
    assert result.unproven_through is None


def test_an_own_row_edited_in_the_database_is_caught_in_the_tenant_export(signing_key, tmp_path):
    """The forger edits acme's row 1, recomputes its hash and re-links every later row: the signed head no
    longer matches, and no redacted row lets the edit through."""
    events = build_chain_v2(["acme", "globex", "acme", "globex"])
    signed = sign_head(signing_key, 4, events[3]["row_hash"])
    forged = copy.deepcopy(events)
    forged[0]["payload"] = {"subject_ref": "someone-else"}
    prev = GENESIS
    for row in forged:
        row["prev_hash"] = prev
        row["row_hash"] = prev = compute_row_hash(row, prev)
    path = tmp_path / "acme.jsonl"
    write_export(path, export_lines(forged, [signed], public_key_b64(signing_key), tenant="acme"))
    result = verify_export(path, public_key_b64=public_key_b64(signing_key))
    assert not result.valid and "rewritten" in result.reason


def test_an_edited_redacted_row_is_caught(signing_key, tmp_path):
    events = build_chain_v2(["acme", "globex", "acme"])
    path = _tenant_export(tmp_path / "acme.jsonl", events, signing_key, "acme")
    lines = path.read_text().splitlines()
    redacted = json.loads(lines[2])
    redacted["body_hash"] = "0" * 64
    lines[2] = json.dumps(redacted)
    path.write_text("\n".join(lines) + "\n")
    result = verify_export(path)
    assert not result.valid and result.first_bad_seq == 2


def test_a_v2_row_cannot_pass_itself_off_as_a_redacted_v1_row(signing_key, tmp_path):
    """Old rows' links are taken on trust when redacted; a newer row claiming to be one is refused."""
    events = build_chain_v2(["acme", "acme", "acme"])
    hidden = {"seq": 2, "hash_version": 1, "redacted": True, "prev_hash": events[1]["prev_hash"],
              "row_hash": events[1]["row_hash"]}
    result = verify_events([events[0], hidden, events[2]])
    assert not result.valid and result.first_bad_seq == 2 and "hash_version 1" in result.reason


def test_unknown_hash_version_is_refused():
    events = build_chain_v2(["acme"])
    events[0]["hash_version"] = 3
    result = verify_events(events)
    assert not result.valid and "unknown hash_version" in result.reason


def test_redacted_v1_rows_are_taken_on_trust_and_reported(signing_key, tmp_path):
    """A chain written before version 2: another tenant's old rows can only be shown by their row_hash, so
    the tenant export verifies but says which rows it cannot prove."""
    legacy = build_chain(4)
    for row in legacy[1::2]:
        row["tenant"] = "globex"
        row["row_hash"] = None
    prev = GENESIS
    for row in legacy:  # rehash with the new tenants
        row["prev_hash"] = prev
        row["row_hash"] = prev = row_hash(prev, row["seq"], row["ts"], row["type"], row["actor"], row["tenant"],
                                          row["payload"])
    events = build_chain_v2(["acme", "globex"], events=legacy)
    path = _tenant_export(tmp_path / "acme.jsonl", events, signing_key, "acme")
    result = verify_export(path, public_key_b64=public_key_b64(signing_key))
    assert result.valid and result.redacted == 3 and result.unproven_through == 4


def test_a_full_row_cannot_claim_to_be_redacted_in_an_export_file(signing_key, tmp_path):
    events = build_chain(3)
    path = tmp_path / "audit.jsonl"
    _write(path, events, [sign_head(signing_key, 3, events[2]["row_hash"])], signing_key)
    lines = path.read_text().splitlines()
    edited = json.loads(lines[2])
    edited["payload"]["step"], edited["redacted"] = 99, True  # an edit dressed up as a row taken on trust
    lines[2] = json.dumps(edited)
    path.write_text("\n".join(lines) + "\n")
    result = verify_export(path)
    assert not result.valid and result.first_bad_seq == 2
