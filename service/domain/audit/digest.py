"""Keyed digests of forget data for the audit record: proof of *what* was forgotten without keeping it.

digest = HMAC-SHA256(key, RFC 8785 canonical JSON of the item), hex. The key never enters the database
(data_dir/keys/hmac.key or UNLEARN_HMAC_KEY), so a leaked audit table cannot be brute-forced against
guessed texts; whoever holds the key and the original text can show a record refers to it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import rfc8785

from service.domain.audit.keyfile import keys_dir, read_or_create

HMAC_KEY_FILE = "hmac.key"
HMAC_KEY_BYTES = 32
MIN_KEY_BYTES = 16


def item_digest(key: bytes, item: Mapping[str, Any]) -> str:
    """HMAC-SHA256 of one forget item ({"text"} or {"prompt", "answer"}), hex."""
    return hmac.new(key, rfc8785.dumps(dict(item)), hashlib.sha256).hexdigest()


def payload_digest(key: bytes, items: Iterable[Mapping[str, Any]]) -> str:
    """HMAC-SHA256 of the whole ordered list of items, hex."""
    return hmac.new(key, rfc8785.dumps([dict(i) for i in items]), hashlib.sha256).hexdigest()


def forget_digests(key: bytes, items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What an audit payload carries about forget data: {count, payload_digest, item_digests}."""
    listed = [dict(i) for i in items]
    return {
        "count": len(listed),
        "payload_digest": payload_digest(key, listed),
        "item_digests": [item_digest(key, i) for i in listed],
    }


def _key_from_env(env_value: str) -> bytes:
    try:
        key = bytes.fromhex(env_value.strip())
    except ValueError:
        raise ValueError("UNLEARN_HMAC_KEY must be hex (e.g. `openssl rand -hex 32`)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"UNLEARN_HMAC_KEY must hold at least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex chars)"
        )
    return key


def load_or_create_hmac_key(data_dir: str | Path, env_value: str | None = None) -> bytes:
    """The digest key: env_value (hex) when given, else data_dir/keys/hmac.key (32 random bytes, 0600)."""
    if env_value:
        return _key_from_env(env_value)
    key = read_or_create(keys_dir(data_dir) / HMAC_KEY_FILE, lambda: secrets.token_bytes(HMAC_KEY_BYTES))
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{HMAC_KEY_FILE} is shorter than {MIN_KEY_BYTES} bytes: corrupt key file")
    return key
