"""The audit hash chain: canonical rows, their hashes, and verification of a sequence of rows.

row_hash_n = SHA-256( bytes.fromhex(prev_hash_n) || JCS({seq, ts, type, actor, tenant, payload}) )
with prev_hash_1 = GENESIS ("0" * 64) and prev_hash_n = row_hash_{n-1}; JCS = RFC 8785 canonical JSON.
Every field a reader relies on is inside the hash, so any edit of a row changes its hash and the next
row's prev_hash no longer matches; seq must run 1, 2, 3, ... so a deleted or reordered row shows as a gap.
What a chain alone cannot show (a cut tail, a chain rebuilt consistently) is caught by signed
checkpoints: `verify_against_checkpoints`.
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


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification. head_* name the last row that verified; first_bad_seq the first that
    did not (or is missing); checkpoints counts the signed checkpoints that matched the chain."""

    valid: bool
    length: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str | None = None
    checkpoints: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _payload_of(event: Mapping[str, Any]) -> Any:
    payload = event.get("payload")
    if isinstance(payload, (str, bytes)):  # a db row stores the canonical JSON text
        return json.loads(payload)
    return payload


def _event_type_of(event: Mapping[str, Any]) -> Any:
    return event["type"] if "type" in event else event.get("event_type")


def _check_row(event: Mapping[str, Any], expected_seq: int, prev: str) -> str | None:
    """Why this row breaks the chain, or None when it is the right next row."""
    seq = event.get("seq")
    if seq != expected_seq:
        if isinstance(seq, int) and seq > expected_seq:
            return f"seq {expected_seq} is missing (next row has seq {seq}): a row was deleted or moved"
        return f"expected seq {expected_seq}, found {seq!r}: rows reordered or duplicated"
    if event.get("prev_hash") != prev:
        return f"prev_hash of seq {seq} does not match the row_hash of seq {seq - 1}"
    try:
        recomputed = row_hash(
            prev,
            seq,
            event["ts"],
            _event_type_of(event),
            event.get("actor"),
            event.get("tenant"),
            _payload_of(event),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return f"seq {seq} is malformed: {exc}"
    if recomputed != event.get("row_hash"):
        return f"row_hash of seq {seq} does not match its contents: the row was edited"
    return None


def verify_events(events: Iterable[Mapping[str, Any]]) -> VerifyResult:
    """Recompute the chain over rows given in seq order (dicts: seq, ts, type, actor, tenant, payload,
    prev_hash, row_hash). Stops trusting at the first bad row but still counts every row in `length`."""
    length, head_seq, head_hash = 0, 0, GENESIS
    first_bad: int | None = None
    reason: str | None = None
    for event in events:
        length += 1
        if first_bad is not None:
            continue
        problem = _check_row(event, head_seq + 1, head_hash)
        if problem is not None:
            first_bad, reason = head_seq + 1, problem
            continue
        head_seq, head_hash = event["seq"], event["row_hash"]
    return VerifyResult(first_bad is None, length, head_seq, head_hash, first_bad, reason)


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
        return VerifyResult(
            False,
            result.length,
            trusted_upto,
            hashes.get(trusted_upto, GENESIS),
            trusted_upto + 1,
            message,
            matched,
        )
    return replace(result, checkpoints=matched)
