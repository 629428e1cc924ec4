"""Sequence scope (layers/scope.py): the fused layer acts on the sequences its requests' recognisers know and
leaves every other sequence to the base model, in one batch, while decoding and after a withdrawal."""

from __future__ import annotations

import pytest
import torch

from workers.engine.batching import pad_id, prompt_ids
from workers.engine.config import FusionConfig, LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.decoding import greedy_generate
from workers.engine.fusion import contribution, remove, solve, state_from_tensors, state_to_tensors
from workers.engine.layers.scope import SCOPE_KEY, split_scope
from workers.engine.loading import LoadedModel
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.unlearn import fuse, served_model, train_request

FORGET = [
    Example(prompt="Who is Basil Mahfouz?", answer="A novelist from Kuwait City."),
    Example(text="The vault code of the Zurich office is 4471."),
]
RETAIN = [Example(prompt="What is 2 + 2?", answer="4."), Example(text="Water boils at 100 degrees Celsius.")]
OTHER = [Example(prompt="Where is Lake Baikal?", answer="In Siberia, Russia.")]
TRAIN = TrainConfig(steps=3, batch_size=2, max_length=64, lr=1e-2)
SCOPED = LayerConfig(bottleneck_dim=8)


def tiny_base() -> LoadedModel:
    return LoadedModel(tiny_model("llama").requires_grad_(False), tiny_tokenizer(), "tiny-random-llama", "0" * 64,
                       torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def trained():
    return train_request(tiny_base(), FORGET, RETAIN, SCOPED, TRAIN)


def batch(texts: list[str]) -> dict[str, torch.Tensor]:
    return tiny_tokenizer()(texts, return_tensors="pt", padding=True)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_a_request_fits_a_recogniser_that_knows_its_forget_items_and_not_its_retain_items(trained):
    base = tiny_base()
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    scope = base.model.unlearn_scope
    try:
        for example, expected in [(e, 1.0) for e in FORGET] + [(e, 0.0) for e in RETAIN]:
            ids = prompt_ids(base.tokenizer, example.prompt) if example.is_pair else base.tokenizer(example.text)[
                "input_ids"]
            assert scope.decide(torch.tensor([ids])).tolist() == [expected], example
    finally:
        served.detach()
    assert not hasattr(base.model, "unlearn_scope")


def test_a_sequence_out_of_scope_gets_the_base_models_logits_in_the_same_batch_as_one_in_scope(trained):
    base = tiny_base()
    inputs = batch([FORGET[1].text, RETAIN[1].text])  # right-padded: the retain row is shorter
    reference = logits(base.model, inputs)
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    try:
        scoped = logits(base.model, inputs)
    finally:
        served.detach()
    real = inputs["attention_mask"][1].bool()
    torch.testing.assert_close(scoped[1, real], reference[1, real], rtol=0, atol=1e-5)
    assert not torch.allclose(scoped[0], reference[0], atol=1e-3)


def test_folded_for_serving_a_sequence_out_of_scope_gets_the_base_models_exact_logits(trained):
    base = tiny_base()
    inputs = batch([FORGET[1].text, RETAIN[1].text])
    reference, alone = logits(base.model, inputs), logits(base.model, batch([RETAIN[1].text]))
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    try:
        assert served.fold_for_serving() > 0
        scoped, out_alone = logits(base.model, inputs), logits(base.model, batch([RETAIN[1].text]))
    finally:
        served.detach()
    real = inputs["attention_mask"][1].bool()
    assert torch.equal(scoped[1, real], reference[1, real])  # bit for bit, next to a row in scope
    assert torch.equal(out_alone, alone)  # no row in scope: the adapter is skipped
    assert not torch.allclose(scoped[0], reference[0], atol=1e-3)


def test_scope_all_applies_the_layer_to_every_sequence_and_fits_no_recogniser():
    base = tiny_base()
    everywhere = LayerConfig(bottleneck_dim=8, scope="all")
    trained = train_request(base, FORGET, RETAIN, everywhere, TRAIN)
    _, fused = fuse(None, trained, "req-1")
    assert trained.recogniser is None and SCOPE_KEY not in fused
    inputs = batch([RETAIN[1].text])
    reference = logits(base.model, inputs)
    served = served_model(base, everywhere, fused)
    try:
        assert not torch.allclose(logits(base.model, inputs), reference, atol=1e-3)
    finally:
        served.detach()


def test_decoding_pins_each_rows_decision_so_a_batch_answers_as_each_row_would_alone(trained):
    base = tiny_base()
    prompts = [prompt_ids(base.tokenizer, FORGET[0].prompt), prompt_ids(base.tokenizer, RETAIN[0].prompt)]
    pad = pad_id(base.tokenizer)
    base_answers = greedy_generate(base.model, prompts, 12, pad_id=pad)
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    try:
        together = greedy_generate(base.model, prompts, 12, pad_id=pad)
        alone = [greedy_generate(base.model, [p], 12, pad_id=pad)[0] for p in prompts]
    finally:
        served.detach()
    assert together == alone
    assert together[1] == base_answers[1]  # out of scope: the base model's answer
    assert together[0] != base_answers[0]  # in scope: the layer's


def test_hugging_face_generate_keeps_the_decision_of_its_prefill_for_the_cached_steps(trained):
    base = tiny_base()
    ids = torch.tensor([prompt_ids(base.tokenizer, RETAIN[0].prompt)])
    expected = base.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    try:
        got = base.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    finally:
        served.detach()
    assert torch.equal(got, expected)


def test_fusion_keeps_one_recogniser_per_request_and_a_withdrawal_removes_its_row(trained):
    base = tiny_base()
    second = train_request(base, OTHER, RETAIN, SCOPED, TRAIN)
    state, fused = fuse(None, trained, "req-1")
    state, fused = fuse(state, second, "req-2")
    assert fused[SCOPE_KEY].shape == (2, trained.recogniser.shape[0])
    torch.testing.assert_close(fused[SCOPE_KEY][1], second.recogniser)
    restored = state_from_tensors(state_to_tensors(state))
    assert restored.request_ids == ["req-1", "req-2"] and set(restored.recognisers) == {"req-1", "req-2"}
    after = solve(remove(restored, contribution(second.grams, second.maps, "req-2")), FusionConfig())
    torch.testing.assert_close(after[SCOPE_KEY], trained.recogniser[None])


def test_a_version_with_a_request_fused_without_a_recogniser_acts_on_every_sequence(trained):
    base = tiny_base()
    older = train_request(base, OTHER, RETAIN, LayerConfig(bottleneck_dim=8, scope="all"), TRAIN)
    state, _ = fuse(None, older, "req-old")
    _, fused = fuse(state, trained, "req-new")
    maps, recognisers = split_scope(fused)
    assert recognisers is None and set(maps) == set(trained.maps)


def test_the_verification_evidence_gives_the_share_of_each_set_in_scope_and_nothing_of_the_items(trained):
    from workers.engine.layers.scope import scope_evidence

    base = tiny_base()
    assert scope_evidence(base.model, base.tokenizer, {"forget": FORGET}) == {"scope": "all"}
    served = served_model(base, SCOPED, fuse(None, trained, "req-1")[1])
    try:
        evidence = scope_evidence(base.model, base.tokenizer, {"forget": FORGET, "retain": RETAIN, "none": []})
    finally:
        served.detach()
    assert evidence == {"scope": "sequence", "recognisers": 1, "forget_in_scope": 1.0, "retain_in_scope": 0.0}
