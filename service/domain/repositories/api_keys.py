"""API keys: stored as SHA-256 hashes of high-entropy secrets, looked up by a public prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.domain.db.models import ApiKey, utcnow

ROLES = ("admin", "requester", "auditor", "inference")
KEY_PREFIX = "ul"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _split(plaintext: str) -> str | None:
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12:
        return None
    return parts[1]


def create_key(session: Session, role: str, tenant: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plaintext is returned once and never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(prefix=prefix, key_hash=hash_key(plaintext), role=role, tenant=tenant, name=name)
    session.add(key)
    session.flush()
    return key, plaintext


def import_key(session: Session, plaintext: str, role: str, tenant: str, name: str) -> ApiKey:
    """Register an operator-chosen key (the bootstrap UNLEARN_ADMIN_KEY). Idempotent."""
    prefix = hash_key("bootstrap:" + plaintext)[:12]
    existing = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if existing is not None:
        return existing
    key = ApiKey(prefix=prefix, key_hash=hash_key(plaintext), role=role, tenant=tenant, name=name)
    session.add(key)
    session.flush()
    return key


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    prefix = _split(plaintext) or hash_key("bootstrap:" + plaintext)[:12]
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    candidate_hash = hash_key(plaintext)
    stored_hash = key.key_hash if key is not None else "0" * 64
    matches = hmac.compare_digest(candidate_hash, stored_hash)  # constant time either way
    if key is None or not matches or key.revoked_at is not None:
        return None
    return key


def get_key(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def find_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id_or_prefix)
    if key is None:
        key = session.scalar(select(ApiKey).where(ApiKey.prefix == key_id_or_prefix))
    return key


def revoke_key(session: Session, key: ApiKey) -> None:
    key.revoked_at = utcnow()
    session.flush()


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))
