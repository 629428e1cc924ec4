"""Ed25519 signatures over the chain head (RFC 8032 via `cryptography`); the key lives outside the db.

Signed message = canonical JSON (RFC 8785) of {"seq": seq, "row_hash": row_hash}. Keys travel as the raw
32-byte public key in base64; key_id = first 16 hex chars of SHA-256(raw public key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.domain.audit.keyfile import keys_dir, read_or_create

SIGNING_KEY_FILE = "audit_ed25519.pem"


def _new_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_or_create_signing_key(data_dir: str | Path) -> Ed25519PrivateKey:
    """The audit signing key at data_dir/keys/audit_ed25519.pem (PKCS#8, mode 0600), created on first use."""
    pem = read_or_create(keys_dir(data_dir) / SIGNING_KEY_FILE, _new_key_pem)
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{SIGNING_KEY_FILE} does not hold an Ed25519 private key")  # noqa: TRY004
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def key_id(public_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(public_b64)).hexdigest()[:16]


def head_message(seq: int, row_hash: str) -> bytes:
    return rfc8785.dumps({"seq": seq, "row_hash": row_hash})


def sign_head(key: Ed25519PrivateKey, seq: int, row_hash: str) -> dict[str, Any]:
    """A checkpoint: {seq, row_hash, signature_b64, public_key_b64, key_id}."""
    public = public_key_b64(key)
    signature = key.sign(head_message(seq, row_hash))
    return {
        "seq": seq,
        "row_hash": row_hash,
        "signature_b64": base64.b64encode(signature).decode(),
        "public_key_b64": public,
        "key_id": key_id(public),
    }


def verify_checkpoint(cp: Mapping[str, Any], public_key_b64: str) -> bool:
    """True iff cp's signature over {seq, row_hash} verifies with the given (trusted) public key.

    Accepts the db column names too (`signature`). The key embedded in cp is ignored on purpose: a forger
    would embed their own.
    """
    signature_b64 = cp.get("signature_b64", cp.get("signature"))
    seq, row_hash = cp.get("seq"), cp.get("row_hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(row_hash, str):
        return False
    if not isinstance(signature_b64, str):
        return False
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(base64.b64decode(signature_b64, validate=True), head_message(seq, row_hash))
    except (InvalidSignature, ValueError, binascii.Error, TypeError):
        return False
    return True
