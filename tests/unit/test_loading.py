"""Base-model loading: built-in tiny models, local dirs, caches and their hashes, offline only."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from workers.engine import loading
from workers.engine.loading import load_base_model, resolve_device, sha256_file
from workers.engine.testing import tiny_model, tiny_tokenizer


def logits(loaded, text="Hello there") -> torch.Tensor:
    batch = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_builtin_loads_frozen_in_eval_mode_with_hash(family, tmp_path):
    loaded = load_base_model(f"tiny-random-{family}", tmp_path, device="cpu")
    assert loaded.name == f"tiny-random-{family}" and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.source_sha256 == sha256_file(tmp_path / f"tiny-random-{family}" / "model.safetensors")
    fresh = tiny_model(family)(**tiny_tokenizer()("Hello there", return_tensors="pt")).logits
    assert torch.equal(logits(loaded), fresh)


def test_tiny_cache_is_reused_with_identical_weights(tmp_path):
    first = load_base_model("tiny-random-llama", tmp_path, device="cpu")
    stamp = (tmp_path / "tiny-random-llama" / "model.safetensors").stat().st_mtime_ns
    second = load_base_model("tiny-random-llama", tmp_path, device="cpu")
    assert (tmp_path / "tiny-random-llama" / "model.safetensors").stat().st_mtime_ns == stamp
    assert second.source_sha256 == first.source_sha256
    assert torch.equal(logits(first), logits(second))


def test_tiny_seed_gives_another_model(tmp_path):
    zero = load_base_model("tiny-random-gpt2", tmp_path, device="cpu")
    one = load_base_model("tiny-random-gpt2", tmp_path, device="cpu", seed=1)
    assert one.source_sha256 != zero.source_sha256


def test_tokenizer_survives_the_cache_with_chat_template(tmp_path):
    loaded = load_base_model("tiny-random-llama", tmp_path, device="cpu")
    messages = [{"role": "user", "content": "hi"}]
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<s>assistant\n")
    assert loaded.tokenizer.pad_token_id == 0


def test_local_dir_loads_and_hash_is_cached(tmp_path, monkeypatch):
    model_dir = tmp_path / "my-model"
    tiny_model("gpt2", seed=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    loaded = load_base_model(str(model_dir), tmp_path / "cache", device="cpu")
    assert loaded.source_sha256 == sha256_file(model_dir / "model.safetensors")
    assert loaded.path == model_dir

    def no_rehash(*_):
        raise AssertionError("hash should come from the cache")

    monkeypatch.setattr(loading, "sha256_file", no_rehash)
    again = load_base_model(str(model_dir), tmp_path / "cache", device="cpu")
    assert again.source_sha256 == loaded.source_sha256


def test_unknown_name_fails_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_base_model("no-such-org/no-such-model", tmp_path, device="cpu")


def test_unknown_tiny_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        load_base_model("tiny-random-bert", tmp_path, device="cpu")


def test_concurrent_cache_builds_publish_one_complete_dir(tmp_path):
    builds = []

    def slow_build(tmp):
        builds.append(threading.get_ident())
        time.sleep(0.2)
        (tmp / "model.safetensors").write_bytes(b"weights")
        return {"source": "test", "source_sha256": "abc"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(loading.build_cache(tmp_path, "m", slow_build)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / "m", tmp_path / "m"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dir left behind


def test_failed_build_leaves_no_cache(tmp_path):
    def broken(tmp):
        (tmp / "half").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loading.build_cache(tmp_path, "m", broken)
    assert list(tmp_path.iterdir()) == []
