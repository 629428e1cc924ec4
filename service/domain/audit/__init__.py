"""Tamper-evident audit trail, pure part (no database): hash chain, digests, signatures, offline export.

A row's hash covers its predecessor's hash, so editing, deleting or reordering any row breaks every link
after it; signed checkpoints of the head (Ed25519, key outside the db) catch what the chain alone cannot:
a truncated tail and a chain rewritten consistently from scratch. The db repository lives in
service/repositories/audit.py.
"""

from service.domain.audit.chain import (
    GENESIS,
    VerifyResult,
    canonical,
    format_ts,
    row_hash,
    verify_against_checkpoints,
    verify_events,
)
from service.domain.audit.digest import item_digest, load_or_create_hmac_key, payload_digest
from service.domain.audit.signing import load_or_create_signing_key, sign_head, verify_checkpoint

__all__ = [
    "GENESIS",
    "VerifyResult",
    "canonical",
    "format_ts",
    "item_digest",
    "load_or_create_hmac_key",
    "load_or_create_signing_key",
    "payload_digest",
    "row_hash",
    "sign_head",
    "verify_against_checkpoints",
    "verify_checkpoint",
    "verify_events",
]
