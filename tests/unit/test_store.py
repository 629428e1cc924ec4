"""Model store: atomic publish, hash verification, no overwrite, staged layers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from workers.engine import store as store_module
from workers.engine.store import FUSED_MAPS, CorruptVersionError, ModelStore


def files() -> dict[str, dict[str, torch.Tensor]]:
    return {
        FUSED_MAPS: {"blocks.0.down": torch.arange(6.0).reshape(3, 2)},
        "fusion_state": {"gram.x": torch.eye(3, dtype=torch.float64)},
    }


MANIFEST = {"parent_version": 0, "base_model": {"name": "tiny-random-llama", "sha256": "ab"},
            "request_ids": ["r1"]}


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_publish_then_load_round_trips(store):
    path = store.publish(1, files(), MANIFEST)
    assert path == store.root / "versions" / "000001"
    loaded, manifest = store.load(1)
    assert torch.equal(loaded[FUSED_MAPS]["blocks.0.down"], files()[FUSED_MAPS]["blocks.0.down"])
    assert loaded["fusion_state"]["gram.x"].dtype == torch.float64
    assert manifest["version"] == 1 and manifest["request_ids"] == ["r1"]
    assert set(manifest["files"]) == {"fused_maps.safetensors", "fusion_state.safetensors"}
    assert store.exists(1) and not store.exists(2) and store.list_versions() == [1]


def test_version_zero_is_the_base_without_directory(store):
    assert store.exists(0)
    assert store.load(0) == ({}, {"version": 0, "files": {}})
    assert store.list_versions() == []


def test_existing_version_is_never_overwritten(store):
    store.publish(1, files(), MANIFEST)
    before = (store.path(1) / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError):
        store.publish(1, {FUSED_MAPS: {"w": torch.zeros(1)}}, MANIFEST)
    assert (store.path(1) / "manifest.json").read_bytes() == before


def test_flipped_byte_is_detected_naming_the_file(store):
    store.publish(1, files(), MANIFEST)
    target = store.path(1) / "fused_maps.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="fused_maps.safetensors"):
        store.load(1)
    with pytest.raises(CorruptVersionError, match="sha256 mismatch"):
        store.verify(1)


def test_missing_file_is_detected(store):
    store.publish(1, files(), MANIFEST)
    os.remove(store.path(1) / "fusion_state.safetensors")
    with pytest.raises(CorruptVersionError, match="fusion_state.safetensors: missing"):
        store.load(1)


def test_added_file_and_edited_manifest_are_detected(store):
    store.publish(1, files(), MANIFEST)
    (store.path(1) / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CorruptVersionError, match="not in manifest"):
        store.verify(1)
    os.remove(store.path(1) / "extra.safetensors")
    manifest_path = store.path(1) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["fused_maps.safetensors"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersionError):
        store.load(1)


def test_failed_publish_leaves_no_partial_directory(store, monkeypatch):
    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "write_synced", crash)
    with pytest.raises(OSError, match="disk full"):
        store.publish(1, files(), MANIFEST)
    assert not store.exists(1) and not store.path(1).exists()
    assert list(store.root.glob(".tmp-*")) == []


def test_reserved_manifest_keys_are_refused(store):
    with pytest.raises(ValueError, match="version"):
        store.publish(1, files(), {"version": 7})


def test_manifest_hash_pins_the_version(store):
    store.publish(1, files(), MANIFEST)
    assert len(store.manifest_sha256(1)) == 64


def test_stage_load_discard(store):
    tensors = {"adapters.0.down.weight": torch.randn(4, 3)}
    store.stage("job-1", tensors, {"request_id": "r1", "layer": {"kind": "bottleneck"}})
    assert store.has_staged("job-1")
    loaded, meta = store.load_staged("job-1")
    assert torch.equal(loaded["adapters.0.down.weight"], tensors["adapters.0.down.weight"])
    assert meta["request_id"] == "r1"
    store.stage("job-1", {"w": torch.ones(1)}, {"request_id": "r1"})  # a retry replaces it
    assert set(store.load_staged("job-1")[0]) == {"w"}
    store.discard_staged("job-1")
    assert not store.has_staged("job-1")
    store.discard_staged("job-1")  # idempotent
    assert list(store.root.glob(".tmp-*")) == []


def test_corrupt_staged_layer_is_detected(store):
    store.stage("job-2", {"w": torch.ones(8)}, {})
    target = store.staged_path("job-2") / "layer.safetensors"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match="layer.safetensors"):
        store.load_staged("job-2")


def test_unsafe_job_id_is_refused(store):
    with pytest.raises(ValueError):
        store.stage("../escape", {"w": torch.ones(1)}, {})


def test_cleanup_removes_only_old_temp_dirs(store):
    old, fresh = store.root / ".tmp-old", store.root / ".tmp-fresh"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (0, 0))
    assert store.cleanup_temp(older_than_s=60) == [old]
    assert fresh.exists() and not old.exists()


def test_export_version_writes_plain_checkpoint_for_lora(store, tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.engine.config import LayerConfig
    from workers.engine.export import export_version
    from workers.engine.layers import create_attached
    from workers.engine.loading import load_base_model
    from workers.engine.versions import BaseModelMismatchError

    base = load_base_model("tiny-random-llama", tmp_path / "cache", device="cpu")
    cfg = LayerConfig(kind="lora", lora_rank=2)
    attached = create_attached(base.model, cfg)
    maps = attached.map_weights()
    attached.detach()
    manifest = {"layer": cfg.to_dict(), "base_model": {"name": base.name, "sha256": base.source_sha256},
                "request_ids": ["r1"], "parent_version": 0}
    store.publish(1, {FUSED_MAPS: maps}, manifest)
    out = export_version(store, base, 1, tmp_path / "v1")
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert json.loads((out / "unlearn_export.json").read_text())["request_ids"] == ["r1"]
    store.publish(2, {FUSED_MAPS: maps}, {**manifest, "base_model": {"name": "x", "sha256": "other"}})
    with pytest.raises(BaseModelMismatchError):
        export_version(store, base, 2, tmp_path / "v2")


def sealed_store(tmp_path) -> ModelStore:
    from service.domain.sealing import Sealer

    return ModelStore(tmp_path / "models", sealer=Sealer(tmp_path / "keys" / "state.key"))


def test_a_sealed_fusion_state_is_ciphertext_on_disk_and_opens_with_the_key(tmp_path):
    from safetensors import SafetensorError
    from safetensors.torch import load as parse_safetensors

    store = sealed_store(tmp_path)
    store.publish(1, files(), MANIFEST)
    on_disk = (store.path(1) / "fusion_state.safetensors").read_bytes()
    with pytest.raises(SafetensorError):
        parse_safetensors(on_disk)
    assert store.manifest(1)["sealed"] == ["fusion_state.safetensors"]
    loaded, _ = store.load(1)
    assert torch.equal(loaded["fusion_state"]["gram.x"], torch.eye(3, dtype=torch.float64))
    assert parse_safetensors((store.path(1) / "fused_maps.safetensors").read_bytes())  # served maps stay plain


def test_a_store_without_the_key_serves_the_maps_and_leaves_the_state_closed(tmp_path):
    sealed_store(tmp_path).publish(1, files(), MANIFEST)
    loaded, _ = ModelStore(tmp_path / "models").load(1)  # the API's store: hashes checked, state not read
    assert set(loaded) == {FUSED_MAPS}


def test_a_sealed_state_copied_into_another_version_does_not_open(tmp_path):
    from cryptography.exceptions import InvalidTag

    store = sealed_store(tmp_path)
    store.publish(1, files(), MANIFEST)
    store.publish(2, files(), MANIFEST)
    stolen = (store.path(1) / "fusion_state.safetensors").read_bytes()
    with pytest.raises(InvalidTag):
        store.sealer.open(stolen, "versions/000002/fusion_state.safetensors")
