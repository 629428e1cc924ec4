"""The real default model (SmolLM2-135M-Instruct GGUF): cached once, reloaded fast, answers correctly."""

from __future__ import annotations

import time

import pytest
import torch

from workers.engine.config import LayerConfig
from workers.engine.layers import create_attached
from workers.engine.layers.base import count_parameters
from workers.engine.layers.lora import lora_parameter_count
from workers.engine.loading import DEFAULT_MODEL, load_base_model

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of Australia?"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def first_load(cache_dir):
    return load_base_model(DEFAULT_MODEL, cache_dir, device="cpu")


def next_token_logits(loaded) -> torch.Tensor:
    batch = loaded.tokenizer(QUESTION, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits[:, -1]


def greedy_answer(loaded, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": QUESTION}]
    batch = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return loaded.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_model_is_smollm2_with_gguf_hash(first_load, cache_dir):
    config = first_load.model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert len(first_load.source_sha256) == 64
    assert (cache_dir / DEFAULT_MODEL / "model.safetensors").is_file()
    assert not any(p.requires_grad for p in first_load.model.parameters())


def test_second_load_is_fast_and_identical(first_load, cache_dir):
    start = time.perf_counter()
    second = load_base_model(DEFAULT_MODEL, cache_dir, device="cpu")
    elapsed = time.perf_counter() - start
    print(f"\ncached load {elapsed:.2f} s")
    assert elapsed < 5.0, f"cached load took {elapsed:.1f} s"
    assert second.source_sha256 == first_load.source_sha256
    assert torch.equal(next_token_logits(second), next_token_logits(first_load))


def test_greedy_chat_answer_names_canberra(first_load):
    answer = greedy_answer(first_load)
    print(f"\nanswer: {answer!r}")
    assert "Canberra" in answer


def test_adapter_sizes_relative_to_base(first_load):
    model = first_load.model
    base, base_logits = count_parameters(model), next_token_logits(first_load)
    attached = create_attached(model, LayerConfig(kind="bottleneck", bottleneck_dim=32))
    bottleneck = count_parameters(attached.layer)
    assert torch.equal(next_token_logits(first_load), base_logits)  # untrained layer = identity
    attached.detach()
    lora = lora_parameter_count(model, LayerConfig(kind="lora", lora_rank=8))
    print(f"\nbase {base:,}  bottleneck r=32 {bottleneck:,} ({bottleneck / base:.2%})  "
          f"lora r=8 gate+up {lora:,} ({lora / base:.2%})")
    assert 0.005 < bottleneck / base < 0.01
    assert lora < bottleneck
