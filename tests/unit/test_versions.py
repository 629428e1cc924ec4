"""Loading a stored version for use (versions.load_version): what it hands back, and every refusal."""

from __future__ import annotations

import pytest
import torch

from workers.engine.config import LayerConfig
from workers.engine.store import FUSED_MAPS, FUSION_STATE, CorruptVersionError, ModelStore
from workers.engine.versions import BaseModelMismatchError, VersionLoadError, load_version

BASE_SHA = "ab" * 32
LAYER = LayerConfig(kind="lora", lora_rank=2)
MAPS = {"blocks.0.up_proj": torch.arange(6.0).reshape(3, 2)}


MANIFEST = {"base_model": {"name": "tiny", "sha256": BASE_SHA}, "layer": LAYER.to_dict(), "request_ids": ["r1"]}
FILES = {FUSED_MAPS: MAPS, FUSION_STATE: {"gram.x": torch.eye(3)}}


def publish(store: ModelStore, version: int = 1, files: dict = FILES, manifest: dict = MANIFEST) -> None:
    store.publish(version, files, manifest)


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_a_version_loads_with_its_layer_maps_and_manifest_hash(store):
    publish(store)
    stored = load_version(store, 1, BASE_SHA, manifest_sha256=store.manifest_sha256(1))
    assert stored.number == 1 and stored.layer == LAYER and stored.request_ids == ["r1"]
    assert torch.equal(stored.fused_maps["blocks.0.up_proj"], MAPS["blocks.0.up_proj"])
    assert stored.manifest_sha256 == store.manifest_sha256(1)


def test_a_missing_version_is_refused(store):
    with pytest.raises(VersionLoadError, match="not in the model store"):
        load_version(store, 3, BASE_SHA)
    with pytest.raises(ValueError, match="0 is the base model"):
        load_version(store, 0, BASE_SHA)


def test_a_manifest_other_than_the_one_on_record_is_refused(store):
    publish(store)
    with pytest.raises(VersionLoadError, match="sha256 on record"):
        load_version(store, 1, BASE_SHA, manifest_sha256="0" * 64)


def test_a_version_fused_on_other_base_weights_is_refused(store):
    publish(store)
    with pytest.raises(BaseModelMismatchError, match=BASE_SHA):
        load_version(store, 1, "cd" * 32)


def test_a_version_without_layer_or_fused_maps_is_refused(store):
    publish(store, 1, manifest={k: v for k, v in MANIFEST.items() if k != "layer"})
    publish(store, 2, files={FUSION_STATE: FILES[FUSION_STATE]})
    with pytest.raises(VersionLoadError, match="no 'layer'"):
        load_version(store, 1, BASE_SHA)
    with pytest.raises(VersionLoadError, match=f"no {FUSED_MAPS} file"):
        load_version(store, 2, BASE_SHA)


def test_a_corrupt_file_is_refused_by_the_store(store):
    publish(store)
    path = store.path(1) / f"{FUSED_MAPS}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="sha256 mismatch"):
        load_version(store, 1, BASE_SHA)
