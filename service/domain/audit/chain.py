"""The audit hash chain: canonical rows, their hashes, and verification of a sequence of rows.

Rows written today (hash_version 2):
  body_hash_n = SHA-256( JCS({hash_version: 2, salt, seq, ts, type, actor, tenant, payload}) )
  row_hash_n  = SHA-256( bytes.fromhex(prev_hash_n) || bytes.fromhex(body_hash_n) )
Rows written before (hash_version 1, still verified):
  row_hash_n  = SHA-256( bytes.fromhex(prev_hash_n) || JCS({seq, ts, type, actor, tenant, payload}) )
with prev_hash_1 = GENESIS ("0" * 64) and prev_hash_n = row_hash_{n-1}; JCS = RFC 8785 canonical JSON.
Every field a reader relies on is inside the hash, so any edit of a row changes its hash and the next
row's prev_hash no longer matches; seq must run 1, 2, 3, ... so a deleted or reordered row shows as a gap.
What a chain alone cannot show (a cut tail, a chain rebuilt consistently) is caught by signed
checkpoints: `verify_against_checkpoints`.

Why version 2 hashes the body first: a row can then be shown *redacted* (seq, prev_hash, body_hash,
row_hash, no content) and its link still recomputes, so one tenant's export proves its own rows without
showing anyone else's (`redact`). The random salt (16 bytes) keeps a redacted row's body_hash from being
confirmed by guessing its content. A redacted version-1 row cannot be recomputed: a verifier takes its
row_hash on trust, so own rows before it are not proven by that export (`VerifyResult.unproven_through`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import rfc8785

from service.domain.audit.signing import verify_checkpoint

GENESIS = "0" * 64
HASH_VERSION = 2  # the format every new row is written in
LEGACY_HASH_VERSION = 1


def canonical(obj: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON bytes. Integers must lie within +-(2**53 - 1)."""
    return rfc8785.dumps(obj)


def format_ts(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a Z suffix: 2024-05-01T12:00:00.000001Z (naive = UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hashed_fields(
    seq: int, ts: str, event_type: str, actor: str | None, tenant: str | None, payload: Any
) -> dict[str, Any]:
    return {"seq": seq, "ts": ts, "type": event_type, "actor": actor, "tenant": tenant, "payload": payload}


def row_hash(
    prev_hash: str,
    seq: int,
    ts: str,
    event_type: str,
    actor: str | None,
    tenant: str | None,
    payload: Any,
) -> str:
    """SHA-256(prev_hash as 32 raw bytes || canonical row fields), hex."""
    body = canonical(hashed_fields(seq, ts, event_type, actor, tenant, payload))
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def _payload_of(event: Mapping[str, Any]) -> Any:
    payload = event.get("payload")
    if isinstance(payload, (str, bytes)):  # a db row stores the canonical JSON text
        return json.loads(payload)
    return payload


def _event_type_of(event: Mapping[str, Any]) -> Any:
    return event["type"] if "type" in event else event.get("event_type")


def body_hash(
    seq: int, ts: str, event_type: str, actor: str | None, tenant: str | None, payload: Any, salt: str
) -> str:
    """Version 2: SHA-256 of the canonical row fields with the version and the row's salt, hex."""
    fields = hashed_fields(seq, ts, event_type, actor, tenant, payload)
    body = {**fields, "hash_version": HASH_VERSION, "salt": salt}
    return hashlib.sha256(canonical(body)).hexdigest()


def link_hash(prev_hash: str, body_hash_hex: str) -> str:
    """Version 2: SHA-256(prev_hash as 32 raw bytes || body_hash as 32 raw bytes), hex."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + bytes.fromhex(body_hash_hex)).hexdigest()


def hash_version_of(event: Mapping[str, Any]) -> int:
    return event.get("hash_version") or LEGACY_HASH_VERSION  # rows and exports from before v2 carry none


def body_hash_of(event: Mapping[str, Any]) -> str:
    """The body hash of a full version-2 row (a db row's payload may be its canonical JSON text)."""
    return body_hash(
        event["seq"], event["ts"], _event_type_of(event), event.get("actor"), event.get("tenant"),
        _payload_of(event), event["salt"],
    )


def compute_row_hash(event: Mapping[str, Any], prev_hash: str) -> str:
    """What a row's row_hash must be after prev_hash, in the row's own hash version."""
    if event.get("redacted"):
        return link_hash(prev_hash, event["body_hash"])
    if hash_version_of(event) == LEGACY_HASH_VERSION:
        return row_hash(
            prev_hash, event["seq"], event["ts"], _event_type_of(event), event.get("actor"),
            event.get("tenant"), _payload_of(event),
        )
    return link_hash(prev_hash, body_hash_of(event))


def redact(event: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its content left out but its link kept: seq, hash_version, prev_hash, row_hash, and for a
    version-2 row its body_hash (from which the link recomputes). A version-1 row has none to give."""
    shown = {"seq": event["seq"], "hash_version": hash_version_of(event), "redacted": True,
             "prev_hash": event["prev_hash"], "row_hash": event["row_hash"]}
    if shown["hash_version"] != LEGACY_HASH_VERSION:
        shown["body_hash"] = body_hash_of(event)
    return shown


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification. head_* name the last row that verified; first_bad_seq the first that
    did not (or is missing); checkpoints counts the signed checkpoints that matched the chain.

    redacted counts rows shown without content (another tenant's); unproven_through is the last seq of a
    redacted version-1 row, whose link had to be taken on trust: rows up to it are not proven by this
    chain (only by the whole one). None when every link recomputed."""

    valid: bool
    length: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str | None = None
    checkpoints: int = 0
    redacted: int = 0
    unproven_through: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_row(event: Mapping[str, Any], expected_seq: int, prev: str, prev_version: int) -> str | None:
    """Why this row breaks the chain, or None when it is the right next row. Versions never go down along
    the chain, so a row cannot pass itself off as an old one whose link is taken on trust."""
    seq = event.get("seq")
    if seq != expected_seq:
        if isinstance(seq, int) and seq > expected_seq:
            return f"seq {expected_seq} is missing (next row has seq {seq}): a row was deleted or moved"
        return f"expected seq {expected_seq}, found {seq!r}: rows reordered or duplicated"
    if event.get("prev_hash") != prev:
        return f"prev_hash of seq {seq} does not match the row_hash of seq {seq - 1}"
    if hash_version_of(event) not in (LEGACY_HASH_VERSION, HASH_VERSION):
        return f"seq {seq} has an unknown hash_version {event.get('hash_version')!r}"
    if hash_version_of(event) < prev_version:
        return f"seq {seq} claims hash_version {hash_version_of(event)} after a version-{prev_version} row"
    if _taken_on_trust(event):
        return None if isinstance(event.get("row_hash"), str) else f"seq {seq} is malformed: no row_hash"
    try:
        recomputed = compute_row_hash(event, prev)
    except (KeyError, TypeError, ValueError) as exc:
        return f"seq {seq} is malformed: {exc}"
    if recomputed != event.get("row_hash"):
        return f"row_hash of seq {seq} does not match its contents: the row was edited"
    return None


def _taken_on_trust(event: Mapping[str, Any]) -> bool:
    """A redacted version-1 row: nothing to recompute its row_hash from."""
    return bool(event.get("redacted")) and hash_version_of(event) == LEGACY_HASH_VERSION


def verify_events(events: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Recompute the chain over rows given in seq order (dicts: seq, ts, type, actor, tenant, payload,
    prev_hash, row_hash, and for version 2 hash_version and salt; or `redact`ed rows). Stops trusting at
    the first bad row but still counts every row in `length`."""
    length, head_seq, head_hash, head_version, redacted = 0, 0, GENESIS, LEGACY_HASH_VERSION, 0
    first_bad: int | None = None
    reason: str | None = None
    unproven_through: int | None = None
    for event in events:
        length += 1
        if first_bad is not None:
            continue
        problem = _check_row(event, head_seq + 1, head_hash, head_version)
        if problem is not None:
            first_bad, reason = head_seq + 1, problem
            continue
        head_seq, head_hash, head_version = event["seq"], event["row_hash"], hash_version_of(event)
        redacted += bool(event.get("redacted"))
        if _taken_on_trust(event):
            unproven_through = head_seq
    return VerifyResult(first_bad is None, length, head_seq, head_hash, first_bad, reason, 0, redacted,
                        unproven_through)


def _row_hashes(events: Iterable[Mapping[str, Any]] | Mapping[int, str]) -> dict[int, str]:
    if isinstance(events, Mapping):
        return dict(events)
    return {e["seq"]: e["row_hash"] for e in events if isinstance(e.get("seq"), int)}


def _checkpoint_problem(
    cp: Mapping[str, Any], hashes: Mapping[int, str], result: VerifyResult, public_key_b64: str
) -> tuple[str, str] | None:
    """(kind, message) with kind "truncated" or "rewritten"; None when the checkpoint holds or is moot."""
    seq = cp.get("seq")
    if not verify_checkpoint(cp, public_key_b64):
        return "rewritten", f"checkpoint at seq {seq} has no valid signature from the trusted key"
    if seq > result.head_seq:
        if result.valid:
            return "truncated", (
                f"chain ends at seq {result.head_seq} but a signed checkpoint covers seq {seq}: "
                "tail truncated"
            )
        return None  # the chain already broke before this checkpoint; that break is the finding
    if hashes.get(seq) != cp.get("row_hash"):
        return (
            "rewritten",
            f"row_hash at seq {seq} differs from the signed checkpoint: the chain was rewritten",
        )
    return None


def verify_against_checkpoints(
    result: VerifyResult,
    events: Iterable[Mapping[str, Any]] | Mapping[int, str],
    checkpoints: Sequence[Mapping[str, Any]],
    public_key: str,
) -> VerifyResult:
    """Check signed checkpoints against a chain already verified by `verify_events`.

    `events` (the same rows, or a {seq: row_hash} map); `public_key`: the trusted raw Ed25519 key, base64.
    - A checkpoint past the verified head: rows were cut off the end; first_bad_seq = head_seq + 1.
    - A checkpoint whose row_hash differs (or whose signature fails): the chain was rebuilt; nothing after
      the last matching checkpoint can be trusted, so head = that checkpoint and first_bad_seq = its seq + 1
      (the rewrite began there or later).
    Rows after the newest checkpoint are protected by the chain alone: sign often.
    """
    hashes = _row_hashes(events)
    trusted_upto, matched = 0, 0
    for cp in sorted(checkpoints, key=lambda c: c["seq"]):
        problem = _checkpoint_problem(cp, hashes, result, public_key)
        if problem is None:
            if cp["seq"] <= result.head_seq:
                trusted_upto, matched = cp["seq"], matched + 1
            continue
        kind, message = problem
        if kind == "truncated":
            return replace(
                result, valid=False, first_bad_seq=result.head_seq + 1, reason=message, checkpoints=matched
            )
        return replace(
            result, valid=False, head_seq=trusted_upto, head_hash=hashes.get(trusted_upto, GENESIS),
            first_bad_seq=trusted_upto + 1, reason=message, checkpoints=matched,
        )
    return replace(result, checkpoints=matched)
