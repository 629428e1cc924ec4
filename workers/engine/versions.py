"""A published model version: loaded from the ModelStore, verified, and turned into the model that serves it.

    stored = load_version(store, n, base.source_sha256, manifest_sha256=row_sha)   # n >= 1
    model = build_serving_model(base.model, stored.layer, stored.fused_maps)

One loader and one builder, for every reader: the API's served model, the export command, verification
(which measures the model the API will serve: the same builder). Version 0 is the base model itself and
has nothing stored.

The manifest is written by `new_manifest` and read by `load_version`, both here: "layer"
(LayerConfig.to_dict()), "base_model": {"name", "sha256"}, "request_ids", "parent_version", "job_id". The
fused maps are the store file FUSED_MAPS, the fusion's running sums the file FUSION_STATE.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .config import LayerConfig
from .layers import attach_fused
from .store import FUSED_MAPS, FUSION_STATE, ModelStore


class VersionLoadError(ValueError):
    """A stored version cannot be used: not in the store, not the one on record, or incomplete."""


class BaseModelMismatchError(VersionLoadError):
    """The version was fused against other base weights than the ones loaded."""


@dataclass(frozen=True)
class StoredVersion:
    number: int
    layer: LayerConfig
    fused_maps: dict[str, Tensor]  # map name -> fused weights W* (fusion.solve), fp32
    manifest: dict[str, Any]
    manifest_sha256: str  # pins every file of the version (the database and the audit log record it)
    fusion_state: dict[str, Tensor] | None  # running Gram sums (fusion.state_to_tensors) to fuse the next request

    @property
    def request_ids(self) -> list[str]:
        return list(self.manifest.get("request_ids", []))


def load_version(store: ModelStore, version: int, base_sha256: str,
                 manifest_sha256: str | None = None) -> StoredVersion:
    """Version `version` with every file checked against the manifest's sha256 (the store does that), the
    manifest against `manifest_sha256` where the caller has one on record, and the base weights it was
    fused on against `base_sha256`: fused maps applied to other weights would serve an unverified model."""
    if version < 1:
        raise ValueError(f"version {version}: only versions >= 1 are stored (0 is the base model)")
    if not store.exists(version):
        raise VersionLoadError(f"version {version} is not in the model store at {store.root}")
    on_disk = store.manifest_sha256(version)
    if manifest_sha256 is not None and on_disk != manifest_sha256:
        raise VersionLoadError(f"version {version}: manifest.json does not match the sha256 on record")
    files, manifest = store.load(version)
    base_model = manifest.get("base_model")
    built_on = base_model.get("sha256") if isinstance(base_model, dict) else None
    if built_on != base_sha256:
        raise BaseModelMismatchError(f"version {version} was built on base sha256 {built_on}, "
                                     f"the loaded base is {base_sha256}")
    if "layer" not in manifest:
        raise VersionLoadError(f"version {version}: manifest has no 'layer' field (LayerConfig.to_dict())")
    if FUSED_MAPS not in files:
        raise VersionLoadError(f"version {version} has no {FUSED_MAPS} file")
    layer = LayerConfig.from_dict(manifest["layer"])
    return StoredVersion(version, layer, files[FUSED_MAPS], manifest, on_disk, files.get(FUSION_STATE))


def new_manifest(parent_version: int, base_name: str, base_sha256: str, layer: LayerConfig, request_ids: list[str],
                 job_id: str) -> dict[str, Any]:
    """The manifest of a version about to be published (what `load_version` reads back)."""
    return {
        "parent_version": parent_version,
        "base_model": {"name": base_name, "sha256": base_sha256},
        "layer": layer.to_dict(),
        "request_ids": list(request_ids),
        "job_id": job_id,
    }


def build_serving_model(base_model: nn.Module, cfg: LayerConfig, fused_maps: dict[str, Tensor]) -> nn.Module:
    """An independent copy of the base serving the fused maps; the base itself is left untouched (it stays
    version 0). The copy holds its layer (merged into its weights, or hooked on) for as long as it lives."""
    model = copy.deepcopy(base_model)
    served = attach_fused(model, cfg, fused_maps)
    fold = getattr(served, "fold_for_serving", None)
    if fold is not None:  # bottleneck: adapters folded into the FFN output projections (one matmul each)
        fold()
    return model
