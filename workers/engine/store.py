"""Model versions on disk: atomic, hash-verified, never overwritten.

Layout under `root`:

    versions/000001/            one published model version (1, 2, ...; version 0 = the base model,
        <file>.safetensors      which has no directory)
        manifest.json           {"version", "files": {name: sha256}, "created_at", ...caller's fields}
    staged/<job_id>/            a trained layer waiting for fusion: layer.safetensors + meta.json
    .tmp-<random>/              a write in progress (or one left by a crash: cleanup_temp removes it)

Every write goes to a temp dir inside `root` (same filesystem), each file and the dir are fsynced, then
the dir is renamed into place: a reader sees a whole version or none. A version is verified (sha256 of
every file against its manifest) before any of it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as _save_safetensors
from torch import Tensor

from .files import fsync_dir, write_synced

MANIFEST = "manifest.json"
STAGED_LAYER = "layer.safetensors"
STAGED_META = "meta.json"
TMP_PREFIX = ".tmp-"
RESERVED_MANIFEST_KEYS = ("version", "files", "created_at", "sealed")
FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# Conventional file names inside a version (callers may add more).
FUSED_MAPS = "fused_maps"  # fused map weights of the layer (fusion.solve output)
FUSION_STATE = "fusion_state"  # running sums (fusion.state_to_tensors) for fusing the next request


class Sealer(Protocol):
    """Authenticated encryption of a file's bytes, bound to `label` (service.domain.sealing.Sealer)."""

    def seal(self, data: bytes, label: str) -> bytes: ...

    def open(self, blob: bytes, label: str) -> bytes: ...


class CorruptVersionError(RuntimeError):
    """A stored version or staged layer is missing a file or a file's hash does not match."""

    def __init__(self, what: str, file: str, reason: str) -> None:
        super().__init__(f"{what}: {file}: {reason}")
        self.what, self.file, self.reason = what, file, reason


def save_safetensors_bytes(tensors: dict[str, Tensor]) -> bytes:
    """safetensors bytes of CPU, contiguous copies (solver outputs may be transposed views)."""
    return _save_safetensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True).encode()


def _seal_label(version: int, file: str) -> str:
    return f"versions/{version:06d}/{file}"  # a sealed file copied into another version does not open


def _check_name(name: str, what: str) -> None:
    if not FILE_NAME.match(name) or name.startswith("."):
        raise ValueError(f"invalid {what} {name!r}: use letters, digits, '_', '-', '.'")


class ModelStore:
    """sealer: encrypts the files named in `sealed` (the fusion state: Gram matrices of forget data) at
    rest; the manifest lists them under "sealed" and hashes the sealed bytes. A store without a sealer (the
    API, export) verifies those files but does not read them."""

    def __init__(self, root: Path, sealer: Sealer | None = None, sealed: tuple[str, ...] = (FUSION_STATE,)) -> None:
        self.root = Path(root)
        self.sealer, self.sealed = sealer, sealed if sealer is not None else ()
        self.versions_dir = self.root / "versions"
        self.staged_dir = self.root / "staged"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staged_dir.mkdir(parents=True, exist_ok=True)

    # -- versions -----------------------------------------------------------------------------

    def path(self, version: int) -> Path:
        if version <= 0:
            raise ValueError(f"version {version} has no directory (0 is the base model)")
        return self.versions_dir / f"{version:06d}"

    def exists(self, version: int) -> bool:
        return version == 0 or (self.path(version) / MANIFEST).is_file()

    def list_versions(self) -> list[int]:
        """Published versions on disk, ascending (the base model, version 0, is not listed)."""
        return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def publish(self, version: int, files: dict[str, dict[str, Tensor]], manifest: dict[str, Any]) -> Path:
        """Write version `version` atomically; FileExistsError if it already exists.

        files: file name (without .safetensors) -> tensors. manifest: the caller's fields
        (parent_version, base model name + sha256, layer config, request ids, ...).
        """
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"model version {version} already exists at {final}")
        clash = sorted(set(manifest) & set(RESERVED_MANIFEST_KEYS))
        if clash:
            raise ValueError(f"manifest keys {clash} are set by the store")
        blobs, sealed = {}, []
        for name, tensors in files.items():
            _check_name(name, "file name")
            file, data = f"{name}.safetensors", save_safetensors_bytes(tensors)
            if name in self.sealed:
                data = self.sealer.seal(data, _seal_label(version, file))
                sealed.append(file)
            blobs[file] = data
        record = {
            **manifest,
            "version": version,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {file: sha256_bytes(data) for file, data in blobs.items()},
            "sealed": sealed,
        }
        blobs[MANIFEST] = _json_bytes(record)
        try:
            self._commit_dir(blobs, final)
        except OSError as err:
            if final.exists():
                raise FileExistsError(f"model version {version} already exists at {final}") from err
            raise
        return final

    def manifest(self, version: int) -> dict[str, Any]:
        if version == 0:
            return {"version": 0, "files": {}}
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise CorruptVersionError(f"version {version}", MANIFEST, "missing")
        try:
            return json.loads(path.read_bytes())
        except ValueError as err:
            raise CorruptVersionError(f"version {version}", MANIFEST, "not valid JSON") from err

    def manifest_sha256(self, version: int) -> str:
        """sha256 of manifest.json: one hash that pins every file of the version (for the audit log)."""
        return sha256_file(self.path(version) / MANIFEST)

    def verify(self, version: int) -> dict[str, Any]:
        """Check every file's sha256; returns the manifest or raises CorruptVersionError."""
        self._read_verified(version)
        return self.manifest(version)

    def load(self, version: int) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """(file name -> tensors, manifest), every file verified against its hash first. Sealed files are
        opened with the sealer, or left out when this store has none."""
        manifest = self.manifest(version)
        blobs = self._read_verified(version)
        files = {}
        for file, data in blobs.items():
            if file in manifest.get("sealed", []):
                if self.sealer is None:
                    continue
                data = self.sealer.open(data, _seal_label(version, file))
            files[file.removesuffix(".safetensors")] = load_safetensors_bytes(data)
        return files, manifest

    def _read_verified(self, version: int) -> dict[str, bytes]:
        """Bytes of every listed file, hashed from the same bytes that are then parsed (no TOCTOU)."""
        if version == 0:
            return {}
        manifest, what, directory = self.manifest(version), f"version {version}", self.path(version)
        listed = manifest.get("files", {})
        blobs = {}
        for file, expected in listed.items():
            path = directory / file
            if not path.is_file():
                raise CorruptVersionError(what, file, "missing")
            data = path.read_bytes()
            if sha256_bytes(data) != expected:
                raise CorruptVersionError(what, file, "sha256 mismatch")
            blobs[file] = data
        unlisted = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST and p.name not in listed)
        if unlisted:
            raise CorruptVersionError(what, unlisted[0], "file not in manifest")
        return blobs

    # -- staged layers (trained, not yet fused) ----------------------------------------------

    def staged_path(self, job_id: str) -> Path:
        _check_name(job_id, "job id")
        return self.staged_dir / job_id

    def stage(self, job_id: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
        """Store a trained layer for job_id atomically; replaces an earlier staging of the same job."""
        final = self.staged_path(job_id)
        layer = save_safetensors_bytes(tensors)
        record = {"meta": meta, "files": {STAGED_LAYER: sha256_bytes(layer)}}
        blobs = {STAGED_LAYER: layer, STAGED_META: _json_bytes(record)}
        if final.exists():
            self.discard_staged(job_id)  # a retried job re-stages the same deterministic layer
        self._commit_dir(blobs, final)
        return final

    def has_staged(self, job_id: str) -> bool:
        return (self.staged_path(job_id) / STAGED_META).is_file()

    def load_staged(self, job_id: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        directory, what = self.staged_path(job_id), f"staged layer {job_id}"
        if not (directory / STAGED_META).is_file():
            raise CorruptVersionError(what, STAGED_META, "missing")
        record = json.loads((directory / STAGED_META).read_bytes())
        if not (directory / STAGED_LAYER).is_file():
            raise CorruptVersionError(what, STAGED_LAYER, "missing")
        data = (directory / STAGED_LAYER).read_bytes()
        if sha256_bytes(data) != record["files"][STAGED_LAYER]:
            raise CorruptVersionError(what, STAGED_LAYER, "sha256 mismatch")
        return load_safetensors_bytes(data), record["meta"]

    def discard_staged(self, job_id: str) -> None:
        """Remove a staged layer (after fusion, or when its job fails); no error if absent."""
        directory = self.staged_path(job_id)
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
            os.rename(directory, trash / "gone")  # atomic: no reader sees a half-deleted layer
            shutil.rmtree(trash, ignore_errors=True)

    # -- temp dirs ------------------------------------------------------------------------

    def _commit_dir(self, blobs: dict[str, bytes], final: Path) -> None:
        """Write blobs into a fresh temp dir, fsync, rename to `final`; the temp dir never survives."""
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.root))
        try:
            for file, data in blobs.items():
                write_synced(tmp / file, data)
            fsync_dir(tmp)
            os.rename(tmp, final)  # fails if final exists and is non-empty: no overwrite
            fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def cleanup_temp(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove temp dirs left by crashed writers (only old ones: a live writer may own a new one)."""
        removed, now = [], time.time()
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            if path.is_dir() and now - path.stat().st_mtime >= older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed
