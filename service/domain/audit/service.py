"""The audit trail on top of the database: checkpoints, whole-chain verification, export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from service.domain.audit.chain import format_ts, verify_against_checkpoints, verify_events
from service.domain.audit.offline import export_lines, write_export
from service.domain.audit.signing import load_or_create_signing_key, public_key_b64, sign_head
from service.domain.db.models import utcnow
from service.domain.db.session import write_lock
from service.domain.repositories import audit


def checkpoint_dicts(session: Session) -> list[dict]:
    return [
        {"seq": c.seq, "row_hash": c.row_hash, "signature_b64": c.signature, "public_key_b64": c.public_key,
         "key_id": c.key_id}
        for c in audit.list_checkpoints(session)
    ]


@dataclass(frozen=True)
class ChainVerification:
    valid: bool
    length: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None
    reason: str | None
    checkpoints_checked: int


def verify_database_chain(session: Session, data_dir: Path) -> ChainVerification:
    """Recompute the chain and check every checkpoint's signature against OUR key (from the data dir,
    never one read from the database: whoever could rewrite the rows could also rewrite a stored key)."""
    events = [audit.event_as_dict(e) for e in audit.iter_all_events(session)]
    result = verify_events(events)
    checkpoints = checkpoint_dicts(session)
    if checkpoints:
        trusted_key = public_key_b64(load_or_create_signing_key(data_dir))
        result = verify_against_checkpoints(result, events, checkpoints, trusted_key)
    return ChainVerification(
        valid=result.valid, length=result.length, head_seq=result.head_seq, head_hash=result.head_hash,
        first_bad_seq=result.first_bad_seq, reason=result.reason, checkpoints_checked=len(checkpoints),
    )


def checkpoint_now(session: Session, data_dir: Path) -> dict | None:
    """Sign the current head and store the checkpoint (caller commits). None when the chain is empty."""
    write_lock(session)
    head = audit.head(session)
    if head is None:
        return None
    signed = sign_head(load_or_create_signing_key(data_dir), head.seq, head.row_hash)
    audit.add_checkpoint(session, signed)
    return signed


def maybe_checkpoint(session: Session, data_dir: Path, every: int) -> dict | None:
    write_lock(session)
    head = audit.head(session)
    last = audit.latest_checkpoint(session)
    if head is None or head.seq - (last.seq if last else 0) < every:
        return None
    return checkpoint_now(session, data_dir)


def export_chain(session: Session, data_dir: Path, out: Path, tenant: str | None = None) -> int:
    """Write the chain as the JSONL that `verify_export` checks offline (atomically); returns the number of
    rows. tenant=None: every row in full (the operator's export); a tenant: its rows in full, every other
    row redacted. Sign the head first (`checkpoint_now`, committed) so the export's last row is covered."""
    events = (audit.event_as_dict(e) for e in audit.iter_all_events(session))
    checkpoints = checkpoint_dicts(session)
    key = public_key_b64(load_or_create_signing_key(data_dir))
    lines = write_export(out, export_lines(events, checkpoints, key, {"exported_at": format_ts(utcnow())}, tenant))
    return lines - 1 - len(checkpoints)
