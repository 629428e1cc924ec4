"""Audit export file (JSON Lines) and its offline verification: no database, no service needed.

Format "unlearn-audit/2", one JSON object per line:
  {"kind": "header", "format": "unlearn-audit/2", "public_key": <raw Ed25519 key, base64>, "key_id",
   "scope": "all" | {"tenant": T}, ...}
  {"kind": "event", "seq", "ts", "type", "actor", "tenant", "request_id", "payload", "prev_hash", "row_hash",
   "hash_version", "salt"}
  {"kind": "redacted", "seq", "hash_version", "body_hash" (version 2 only), "prev_hash", "row_hash"}
  ... (every row of the chain, seq order)
  {"kind": "checkpoint", "seq", "row_hash", "signature_b64", "public_key_b64", "key_id"}
A tenant's export (scope {"tenant": T}) shows T's rows in full and every other row redacted: the chain and
the signed heads still verify end to end, and the only thing it tells about others is that rows exist.
"unlearn-audit/1" files (no scope, no redacted rows, version-1 rows) still read and verify.
The header's key is only as trustworthy as the file: pass the operator's published key as
`public_key_b64` to pin it, otherwise a forger could re-sign a rebuilt chain with a key of their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.domain.audit.chain import GENESIS, VerifyResult, redact, verify_against_checkpoints, verify_events
from service.domain.audit.signing import key_id
from service.domain.audit.signing import public_key_b64 as encode_public_key

FORMAT = "unlearn-audit/2"
READABLE_FORMATS = ("unlearn-audit/1", FORMAT)
EVENT_FIELDS = (
    "seq", "ts", "type", "actor", "tenant", "request_id", "payload", "prev_hash", "row_hash", "hash_version", "salt",
)
REDACTED_FIELDS = ("seq", "hash_version", "body_hash", "prev_hash", "row_hash")
CHECKPOINT_FIELDS = ("seq", "row_hash", "signature_b64", "public_key_b64", "key_id")


class ExportFormatError(ValueError):
    """The file is not a well-formed unlearn-audit export (names the line)."""


@dataclass
class AuditExport:
    header: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def export_header(key: Ed25519PrivateKey | Ed25519PublicKey | str, **extra: Any) -> dict[str, Any]:
    """The header line's object for a signing key (private, public, or raw public key base64)."""
    public = key if isinstance(key, str) else encode_public_key(key)
    return {"kind": "header", "format": FORMAT, "public_key": public, "key_id": key_id(public), **extra}


def export_lines(
    events: Iterable[Mapping[str, Any]],
    checkpoints: Iterable[Mapping[str, Any]],
    public_key_b64: str,
    header_extra: Mapping[str, Any] | None = None,
    tenant: str | None = None,
) -> Iterator[str]:
    """The export, line by line (no newline). `header_extra` adds fields such as exported_at; `tenant` makes
    it that tenant's export: its rows in full, every other row (other tenants', the system's) redacted."""
    scope = "all" if tenant is None else {"tenant": tenant}
    yield json.dumps(export_header(public_key_b64, scope=scope, **(header_extra or {})))
    for event in events:
        if tenant is None or event.get("tenant") == tenant:
            yield json.dumps({"kind": "event", **{k: event.get(k) for k in EVENT_FIELDS}})
        else:
            shown = redact(event)
            yield json.dumps({"kind": "redacted", **{k: shown[k] for k in REDACTED_FIELDS if k in shown}})
    for cp in checkpoints:
        yield json.dumps({"kind": "checkpoint", **{k: cp.get(k) for k in CHECKPOINT_FIELDS}})


def write_export(path: str | Path, lines: Iterable[str]) -> int:
    """Write export lines atomically (temp file, fsync, rename); returns the number of lines."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(line + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return count


def _parse_line(number: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or obj.get("kind") not in ("header", "event", "redacted", "checkpoint"):
        raise ExportFormatError(f"line {number}: expected an object with kind header/event/redacted/checkpoint")
    return obj


def _check_checkpoint(number: int, obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("seq"), int) or not isinstance(obj.get("row_hash"), str):
        raise ExportFormatError(f"line {number}: checkpoint needs integer seq and string row_hash")


def read_export(path: str | Path) -> AuditExport:
    """Parse an export file; raises ExportFormatError naming the first bad line."""
    export: AuditExport | None = None
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            obj = _parse_line(number, raw)
            kind = obj.pop("kind")
            if export is None:
                if kind != "header" or obj.get("format") not in READABLE_FORMATS:
                    raise ExportFormatError(f"line {number}: first line must be a {FORMAT} header")
                export = AuditExport(header=obj)
            elif kind == "header":
                raise ExportFormatError(f"line {number}: a second header")
            elif kind == "event":  # a full row is never read as a redacted one, whatever keys it carries
                export.events.append({k: v for k, v in obj.items() if k != "redacted"})
            elif kind == "redacted":
                export.events.append({**obj, "redacted": True})
            else:
                _check_checkpoint(number, obj)
                export.checkpoints.append(obj)
    if export is None:
        raise ExportFormatError("empty file: no header")
    return export


def verify_export(path: str | Path, public_key_b64: str | None = None) -> VerifyResult:
    """Verify an export with no db: the hash chain, then every signed checkpoint against it.

    public_key_b64 pins the trusted key; without it the header's key is used. A malformed file, or a
    header key that differs from the pinned one, is an invalid result (reason says why), not an exception.
    """
    try:
        export = read_export(path)
    except (OSError, ExportFormatError) as exc:
        return VerifyResult(False, 0, 0, GENESIS, None, f"unreadable export: {exc}")
    header_key = export.header.get("public_key")
    trusted = public_key_b64 or header_key
    result = verify_events(export.events)
    if public_key_b64 and header_key != public_key_b64:
        return VerifyResult(
            False, result.length, 0, GENESIS, 1, "export is signed by a different key than the pinned one"
        )
    if not isinstance(trusted, str):
        return VerifyResult(False, result.length, 0, GENESIS, 1, "export header has no public key")
    return verify_against_checkpoints(result, export.events, export.checkpoints, trusted)
