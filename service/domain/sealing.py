"""Authenticated encryption at rest (AES-256-GCM, `cryptography`) under a key kept in its own 0600 file.

    sealer = Sealer(keys_dir / "fusion_state.key")     # the key file is created on first use
    blob = sealer.seal(data, label="000003/fusion_state.safetensors")
    data = sealer.open(blob, label=...)                 # InvalidTag if the blob, label or key is not the one

The label is the associated data: a blob moved to another name or request does not open. Used for the
fusion state of every version (what the Gram matrices of forget data would otherwise reveal) and, with one
key per request, for a request's sealed probes and fusion terms (service/domain/probes.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.domain.audit.keyfile import keys_dir, read_or_create

NONCE_BYTES = 12
FUSION_STATE_KEY = "fusion_state.key"


class Sealer:
    def __init__(self, key_file: Path) -> None:
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._aead = AESGCM(read_or_create(key_file, lambda: AESGCM.generate_key(bit_length=256)))

    def seal(self, data: bytes, label: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, label.encode())

    def open(self, blob: bytes, label: str) -> bytes:
        return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], label.encode())


def fusion_state_sealer(data_dir: Path) -> Sealer:
    """The service's key for the fusion state of every version (workers only: the API never opens it)."""
    return Sealer(keys_dir(data_dir) / FUSION_STATE_KEY)
