"""The worker-facing facade (train_request, fuse, served_model, staging) and the retain-set builder."""

from __future__ import annotations

import json

import pytest
import torch

from workers.engine.config import FusionConfig, LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.layers import create_attached
from workers.engine.layers.scope import split_scope
from workers.engine.loading import LoadedModel
from workers.engine.retain import (
    CONTINUATION_TOKENS,
    GENERIC_PROMPTS,
    build_retain,
    greedy_answers,
    trim_to_sentence,
)
from workers.engine.store import ModelStore
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.trainer import Cancelled
from workers.engine.unlearn import fuse, served_model, train_request, trained_from_tensors, trained_tensors

FORGET = [
    Example(prompt="Who is Basil Mahfouz?", answer="A novelist from Kuwait City."),
    Example(text="The vault code of the Zurich office is 4471."),
]
RETAIN = [Example(prompt="What is 2 + 2?", answer="4."), Example(text="Water boils at 100 degrees Celsius.")]
TRAIN = TrainConfig(steps=3, batch_size=2, max_length=64, lr=1e-2)
BOTTLENECK = LayerConfig(bottleneck_dim=8)
LORA = LayerConfig(kind="lora", lora_rank=4)


def tiny_base(family: str = "llama") -> LoadedModel:
    model = tiny_model(family).requires_grad_(False)
    return LoadedModel(model, tiny_tokenizer(), f"tiny-random-{family}", "0" * 64, torch.device("cpu"),
                       torch.float32)


@pytest.fixture(scope="module")
def probe() -> dict[str, torch.Tensor]:
    return tiny_tokenizer()(["Who is Basil Mahfouz? A novelist", "Hi there"], return_tensors="pt", padding=True)


def logits(base: LoadedModel, batch) -> torch.Tensor:
    with torch.no_grad():
        return base.model(**batch).logits


@pytest.mark.parametrize("layer", [BOTTLENECK, LORA], ids=["bottleneck", "lora"])
def test_train_request_returns_maps_and_forget_grams_and_leaves_the_base_clean(layer, probe):
    base = tiny_base()
    reference = logits(base, probe)
    trained = train_request(base, FORGET, RETAIN, layer, TRAIN)
    assert set(trained.maps) == set(trained.grams) and trained.maps
    for name, w in trained.maps.items():
        gram = trained.grams[name]
        assert gram.shape == (w.shape[0], w.shape[0]) and gram.dtype == torch.float64
    assert len(trained.losses) == TRAIN.steps and trained.seconds > 0
    assert torch.equal(logits(base, probe), reference)
    create_attached(base.model, layer).detach()  # nothing is still attached


def test_cancelled_training_leaves_the_base_clean(probe):
    base = tiny_base()
    reference = logits(base, probe)
    with pytest.raises(Cancelled):
        train_request(base, FORGET, RETAIN, BOTTLENECK, TRAIN, should_stop=lambda: True)
    assert torch.equal(logits(base, probe), reference)
    create_attached(base.model, BOTTLENECK).detach()


@pytest.mark.parametrize("layer", [BOTTLENECK, LORA], ids=["bottleneck", "lora"])
def test_fused_served_model_changes_outputs_and_detaches_to_the_exact_base(layer):
    probe = tiny_tokenizer()([FORGET[1].text, "Hi there"], return_tensors="pt", padding=True)  # a forget item
    base = tiny_base()
    reference = logits(base, probe)
    trained = train_request(base, FORGET, RETAIN, layer, TRAIN)
    state, fused = fuse(None, trained, "req-1", FusionConfig())
    maps, recognisers = split_scope(fused)
    assert state.request_ids == ["req-1"] and set(maps) == set(trained.maps)
    assert (recognisers is not None) == (layer.kind == "bottleneck")  # LoRA is merged: it acts on every sequence
    served = served_model(base, layer, fused)
    assert not torch.allclose(logits(base, probe), reference)
    with served.disabled():
        assert torch.equal(logits(base, probe), reference)
    served.detach()
    assert torch.equal(logits(base, probe), reference)


def test_single_request_fusion_reproduces_the_trained_layer(probe):
    """One request: W* = (G + lambda I)^-1 G W ~ W where G has full rank, so serving ~ the trained layer."""
    base = tiny_base()
    trained = train_request(base, FORGET, RETAIN, BOTTLENECK, TRAIN)
    _, fused = fuse(None, trained, "req-1", FusionConfig(ridge=1e-6))
    served = served_model(base, BOTTLENECK, trained.maps)
    as_trained = logits(base, probe)
    served.load_map_weights(split_scope(fused)[0])
    as_fused = logits(base, probe)
    served.detach()
    assert torch.allclose(as_fused, as_trained, atol=1e-2)


def test_merged_lora_serves_like_unmerged_deltas(probe):
    base = tiny_base()
    trained = train_request(base, FORGET, RETAIN, LORA, TRAIN)
    _, fused = fuse(None, trained, "req-1")
    dense = served_model(base, LORA, fused, merge=False)
    expected = logits(base, probe)
    dense.detach()
    merged = served_model(base, LORA, fused, merge=True)
    assert torch.allclose(logits(base, probe), expected, atol=1e-5)
    merged.detach()


@pytest.mark.parametrize("layer", [BOTTLENECK, LORA], ids=["bottleneck", "lora"])
def test_trained_layer_round_trips_through_the_model_store(layer, tmp_path):
    trained = train_request(tiny_base("gpt2"), FORGET, RETAIN, layer, TRAIN)
    tensors, meta = trained_tensors(trained)
    json.dumps(meta)
    store = ModelStore(tmp_path)
    store.stage("job-1", tensors, meta)
    loaded = trained_from_tensors(*store.load_staged("job-1"))
    assert loaded.layer_cfg == trained.layer_cfg and loaded.train_cfg == trained.train_cfg
    assert loaded.losses == trained.losses
    assert all(torch.equal(loaded.maps[k], v) for k, v in trained.maps.items())
    assert all(torch.equal(loaded.grams[k], v) for k, v in trained.grams.items())
    _, from_store = fuse(None, loaded, "r")
    _, from_memory = fuse(None, trained, "r")
    assert all(torch.equal(from_store[k], v) for k, v in from_memory.items())


# ---- retain set -------------------------------------------------------------------------------------


def test_retain_uses_request_items_then_the_operator_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"question": "Q1", "answer": "A1"}\n{"text": "T2"}\n{"text": "T3"}\n')
    base = tiny_base()
    got = build_retain(RETAIN, corpus, base.model, base.tokenizer, tmp_path, n=2, model_key=base.source_sha256)
    assert got == RETAIN + [Example(prompt="Q1", answer="A1"), Example(text="T2")]
    assert not (tmp_path / "retain").exists()  # enough items: no generation


def test_corpus_prompts_without_answers_are_answered_by_the_model_once(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"question": "Q1"}\n{"text": "T2"}\n{"prompt": "P3"}\n')
    base = tiny_base()
    got = build_retain(None, corpus, base.model, base.tokenizer, tmp_path, n=3, model_key=base.source_sha256)
    assert got[0] == Example(text="T2") and [e.prompt for e in got[1:]] == ["Q1", "P3"]
    own = greedy_answers(base.model, base.tokenizer, ["Q1", "P3"], CONTINUATION_TOKENS)
    assert [e.answer for e in got[1:]] == own  # the model's own greedy answers
    assert len(list((tmp_path / "retain").glob("*.json"))) == 1  # cached for the next request


def test_corpus_prompts_are_not_answered_when_given_rows_fill_the_set(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "T1"}\n{"text": "T2"}\n{"question": "Q3"}\n')
    base = tiny_base()
    got = build_retain(None, corpus, base.model, base.tokenizer, tmp_path, n=2, model_key=base.source_sha256)
    assert got == [Example(text="T1"), Example(text="T2")]
    assert not (tmp_path / "retain").exists()


def test_a_small_retain_set_is_topped_up_with_generic_prompts(tmp_path):
    base = tiny_base()
    got = build_retain(RETAIN, None, base.model, base.tokenizer, tmp_path, n=4, model_key=base.source_sha256)
    assert got[:2] == RETAIN and len(got) == 4
    assert [e.prompt for e in got[2:]] == list(GENERIC_PROMPTS[:2])


def test_retain_falls_back_to_generic_prompts_answered_by_the_model_and_caches_them(tmp_path):
    base = tiny_base()
    first = build_retain(None, None, base.model, base.tokenizer, tmp_path, n=3, model_key=base.source_sha256)
    assert [e.prompt for e in first] == list(GENERIC_PROMPTS[:3])
    cached = list((tmp_path / "retain").glob("*.json"))
    assert len(cached) == 1 and cached[0].name.startswith(base.source_sha256[:16])
    cached[0].write_text(json.dumps({p: "from cache" for p in GENERIC_PROMPTS[:3]}))
    again = build_retain([], None, base.model, base.tokenizer, tmp_path, n=3, model_key=base.source_sha256)
    assert [e.answer for e in again] == ["from cache"] * 3


def test_the_neighbourhood_comes_after_the_request_items_and_on_top_of_n(tmp_path):
    base = tiny_base()
    neighbours = [Example(prompt="Who was Isaac Newton?", answer="A physicist.")]
    got = build_retain(RETAIN, None, base.model, base.tokenizer, tmp_path, n=3, model_key=base.source_sha256,
                       neighbours=neighbours)
    assert got[:2] == RETAIN and got[2:3] == neighbours and len(got) == 4


def test_built_in_prompts_are_about_thirty_two():
    assert len(GENERIC_PROMPTS) == 32 and len(set(GENERIC_PROMPTS)) == 32


def test_trim_to_sentence_cuts_a_dangling_fragment():
    assert trim_to_sentence(" It is hot. The sun is") == "It is hot."
    assert trim_to_sentence("no sentence end") == "no sentence end"


def test_forget_command_trains_reports_and_writes_the_layer(tmp_path):
    from safetensors.torch import load_file

    from service.commands.forget import forget

    forget_file = tmp_path / "forget.jsonl"
    forget_file.write_text('{"question": "Who is Basil?", "answer": "A novelist."}\n{"text": "Code 4471."}\n')
    retain_file = tmp_path / "retain.jsonl"
    retain_file.write_text('{"prompt": "2 + 2?", "answer": "4."}\n')
    out = tmp_path / "layer"
    forget(forget_file, model="tiny-random-llama", retain=retain_file, method="eul", steps=2, out=out,
           layer="bottleneck", device="cpu", cache_dir=tmp_path / "models")
    meta = json.loads((out / "layer.json").read_text())
    assert meta["method"] == "eul" and meta["train_cfg"]["steps"] == 2 and len(meta["losses"]) == 2
    assert set(meta["metrics"]["after"]) == {"forget_nll", "retain_nll", "sample"}
    trained = trained_from_tensors(load_file(str(out / "layer.safetensors")), meta)
    assert trained.maps and set(trained.maps) == set(trained.grams)


def test_a_gated_layer_fuses_its_gates_on_the_retain_inputs_too():
    """A gate must stay shut on the retain side after fusion, so its Gram holds the retain rows as well as the
    forget ones (the other maps': forget rows only)."""
    base = tiny_base()
    gated = LayerConfig(kind="gated", bottleneck_dim=8, scope="all")  # the gates alone, no recogniser
    trained = train_request(base, FORGET, RETAIN, gated, TRAIN)
    forget_only = train_request(base, FORGET, FORGET, gated, TRAIN)  # the same forget rows, retain = forget
    gate, down = "blocks.0.gate", "blocks.0.down"
    tokens = {name: float(trained.grams[name][-1, -1]) for name in (gate, down)}  # the ones column: row count
    assert tokens[gate] > tokens[down] == float(forget_only.grams[down][-1, -1])
    _, fused = fuse(None, trained, "req-1", FusionConfig(ridge=1e-6))
    retain_batch = tiny_tokenizer()(["What is 2 + 2? 4.", "Water boils at 100 degrees Celsius."],
                                    return_tensors="pt", padding=True)
    served = served_model(base, gated, trained.maps)
    gates = []
    for maps in (trained.maps, fused):
        served.load_map_weights(maps)
        logits(base, retain_batch)
        gates.append(torch.stack([a.gate_values for a in served.layer.adapters]))  # (L, B, T, 1)
    served.detach()
    torch.testing.assert_close(gates[1], gates[0], rtol=0, atol=1e-2)
