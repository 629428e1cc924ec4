"""Quantized export and its verification: the GGUF file holds exactly the weights the forget checks ran on."""

from __future__ import annotations

import json

import pytest
import torch

from workers.engine.blocks import find_ffn_blocks
from workers.engine.config import LayerConfig
from workers.engine.layers.bottleneck import UnlearningLayer, attach
from workers.engine.quantized import UnsupportedQuantizationError, quantized_copy, round_trip, write_gguf
from workers.engine.testing import tiny_model, tiny_tokenizer

PROMPT = "The capital of Australia is"


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer([PROMPT], return_tensors="pt")).logits


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
def test_gguf_file_loads_in_transformers_with_exactly_the_quantized_copy_weights(quant, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", quant, name="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    quantized = quantized_copy(model, quant)
    assert torch.equal(logits(loaded, tokenizer), logits(quantized, tokenizer))
    assert not torch.equal(logits(quantized, tokenizer), logits(model, tokenizer))  # it did round
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left


def test_gguf_tokenizer_encodes_and_templates_as_the_original(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer()
    path = write_gguf(tiny_model("llama"), tokenizer, tmp_path / "m.gguf", "q8_0", name="tiny")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    messages = [{"role": "user", "content": "Wer schrieb Hamlet? Ünïcode"}]
    assert loaded(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_quantized_copy_leaves_the_model_alone_and_keeps_norms_exact():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantized_copy(model, "q4_1")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    norms = [k for k in before if "norm" in k]
    assert norms and all(torch.equal(quantized.state_dict()[k], before[k]) for k in norms)


def test_a_folded_serving_copy_is_quantized_with_its_base_projections_rounded():
    model = tiny_model("llama")
    attach(model, UnlearningLayer.create(model, LayerConfig(), seed=0)).fold_for_serving()
    quantized = quantized_copy(model, "q4_1")
    for block, copy in zip(find_ffn_blocks(model), find_ffn_blocks(quantized)):
        base_weight = block.down_proj.projection.weight
        assert torch.equal(copy.down_proj.projection.weight, round_trip(base_weight, "q4_1"))
        assert not torch.equal(copy.down_proj.projection.weight, base_weight)


def test_unknown_quantization_and_architecture_are_refused(tmp_path):
    with pytest.raises(UnsupportedQuantizationError, match="q4_1"):
        quantized_copy(tiny_model("llama"), "q3_x")
    with pytest.raises(UnsupportedQuantizationError, match="llama architecture"):
        write_gguf(tiny_model("gpt2"), tiny_tokenizer(), tmp_path / "m.gguf", "q8_0", name="tiny")
    assert not list(tmp_path.iterdir())


def test_quantized_forget_reports_a_model_that_remembers():
    """The forget checks on a quantized model that forgot nothing (the base itself): not forgotten, with the
    failed check as the reason."""
    from workers.engine.data import Example
    from workers.engine.verify import Thresholds, evaluate_forget, quantized_forget

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    forget = [Example(prompt="Where was Basil born?", answer="He was born in Kuwait City.")]
    result = quantized_forget(model, tokenizer, forget, evaluate_forget(model, tokenizer, forget), Thresholds(),
                              "q4_1")
    assert result["format"] == "q4_1" and result["forgotten"] is False
    assert result["checks"]["forget_nll_ratio"]["ok"] is False and "forget_nll_ratio" in result["reasons"][0]
    json.dumps(result)  # JSON evidence


def test_export_version_zero_as_gguf_records_the_format(tmp_path):
    from transformers import AutoModelForCausalLM

    from workers.engine.export import export_version, gguf_file_name
    from workers.engine.loading import load_base_model
    from workers.engine.store import ModelStore

    base = load_base_model("tiny-random-llama", tmp_path / "cache", device="cpu")
    out = export_version(ModelStore(tmp_path / "store"), base, 0, tmp_path / "v0", gguf="q8_0")
    assert json.loads((out / "unlearn_export.json").read_text())["format"] == "q8_0"
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file_name("q8_0"))
    assert torch.equal(logits(loaded, base.tokenizer), logits(quantized_copy(base.model, "q8_0"), base.tokenizer))


def test_a_linear_version_exports_as_gguf_with_its_merged_biases(tmp_path):
    """llama.cpp's llama graph reads optional ffn biases; transformers reads them given mlp_bias=True."""
    from transformers import AutoModelForCausalLM

    from workers.engine.config import LayerConfig
    from workers.engine.layers import create_attached, get_layer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, LayerConfig(kind="linear", bottleneck_dim=4))
    with torch.no_grad():
        for param in attached.trainable_parameters():
            param.add_(0.5 * torch.randn_like(param))
    maps = attached.map_weights()
    attached.detach()
    merged = get_layer("linear").merged_copy(model, maps)
    path = write_gguf(merged, tokenizer, tmp_path / "m.gguf", "q8_0", name="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, mlp_bias=True)
    assert torch.equal(logits(loaded, tokenizer), logits(quantized_copy(merged, "q8_0"), tokenizer))
