"""Create-once secret files: written whole with mode 0600, never overwritten, safe under concurrent starts."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def keys_dir(data_dir: str | Path) -> Path:
    path = Path(data_dir) / "keys"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def read_or_create(path: Path, make_bytes: Callable[[], bytes]) -> bytes:
    """The file's bytes; if absent, write make_bytes() to it first.

    Written to a private temp file then hard-linked into place: link fails if the name exists, so two
    processes starting at once both end up reading the one key that won, never a half-written file.
    """
    if path.exists():
        return path.read_bytes()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(make_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()
