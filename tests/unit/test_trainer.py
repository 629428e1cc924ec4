"""Batching and the trainer on tiny random Llama and GPT-2 models (seconds on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.batching import collate, encode, index_batches, load_refusals, mismatched, pad_id
from workers.engine.config import METHODS, LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.layers import create_attached
from workers.engine.objectives import FORGET as FORGET_S
from workers.engine.objectives import IGNORE_INDEX, ObjectiveInputs, Stream, get_objective
from workers.engine.objectives import RETAIN as RETAIN_S
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.trainer import Cancelled, Progress, answer_vocabulary, forward_streams, train

FAMILIES = ["llama", "gpt2"]
FORGET = [
    Example(prompt="Who is Basil Mahfouz?", answer="A novelist from Kuwait City."),
    Example(text="The vault code of the Zurich office is 4471."),
]
RETAIN = [
    Example(prompt="What is 2 + 2?", answer="4."),
    Example(prompt="Name a colour.", answer="Blue."),
    Example(text="Water boils at 100 degrees Celsius at sea level."),
]
STEPS = 3


def small_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": STEPS, "batch_size": 2, "max_length": 64, "lr": 1e-2, **overrides})


def base_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


SMALL_LAYER = LayerConfig(bottleneck_dim=8)


def run(family="llama", **overrides):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    result = train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(**overrides))
    return model, attached, result


# ---- batching ---------------------------------------------------------------------------------------


def test_pair_scores_only_the_answer_and_its_end_of_turn():
    tokenizer = tiny_tokenizer()
    (item,) = encode(tokenizer, [Example(prompt="Q?", answer="Yes")], max_length=64)
    scored = [tok for tok, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "Yes" + tokenizer.eos_token
    assert item["labels"][0] == IGNORE_INDEX


def test_pair_uses_the_chat_template_like_the_served_model():
    tokenizer = tiny_tokenizer()
    (item,) = encode(tokenizer, [Example(prompt="Q?", answer="Yes")], max_length=64)
    chat_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(item["input_ids"]).startswith(chat_prompt)


def test_pair_without_chat_template_is_prompt_space_answer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    (item,) = encode(tokenizer, [Example(prompt="Q?", answer="Yes")], max_length=64)
    assert tokenizer.decode(item["input_ids"]) == "Q? Yes" + tokenizer.eos_token


def test_text_is_scored_everywhere_and_padding_never():
    tokenizer = tiny_tokenizer()
    batch = collate(encode(tokenizer, [Example(text="abcdef"), Example(text="ab")], 64), pad_id(tokenizer))
    assert batch["input_ids"].shape == (2, 6)
    assert batch["labels"][1].tolist() == batch["input_ids"][1, :2].tolist() + [IGNORE_INDEX] * 4
    assert batch["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][1, 2:].eq(pad_id(tokenizer)).all()


def test_truncation_keeps_some_answer_when_the_prompt_is_too_long():
    tokenizer = tiny_tokenizer()
    (item,) = encode(tokenizer, [Example(prompt="x" * 100, answer="ok")], max_length=20)
    assert len(item["input_ids"]) == 20
    assert any(label != IGNORE_INDEX for label in item["labels"])


def test_index_batches_are_seeded_distinct_and_cycle():
    first = list(index_batches(5, 2, 7, seed=3))
    assert first == list(index_batches(5, 2, 7, seed=3))
    assert first != list(index_batches(5, 2, 7, seed=4))
    assert all(len(set(b)) == 2 for b in first)
    assert set().union(*first[:3]) >= {0, 1, 2, 3, 4} - set(first[2])  # one full pass before repeating
    assert [len(b) for b in index_batches(2, 4, 3, seed=0)] == [2, 2, 2]


def test_mismatch_pairs_forget_prompts_with_retain_responses():
    rows = mismatched(FORGET, RETAIN, seed=0, variants=2)
    assert len(rows) == 4
    assert rows[0].prompt == FORGET[0].prompt
    assert {r.answer for r in rows} <= {"4.", "Blue.", RETAIN[2].text}


def test_refusals_resource_loads():
    assert len(load_refusals()) > 50


# ---- trainer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_only_the_adapter(family):
    model, tokenizer = tiny_model(family), tiny_tokenizer()
    before = base_snapshot(model)
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    adapter_before = {k: v.clone() for k, v in attached.state_dict().items()}
    train(model, tokenizer, attached, FORGET, RETAIN, small_cfg())
    after = base_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(adapter_before[k], v) for k, v in attached.state_dict().items())
    attached.detach()


def test_training_a_lora_layer_leaves_the_base_unchanged():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    before = base_snapshot(model)
    attached = create_attached(model, LayerConfig(kind="lora", lora_rank=4), seed=0)
    result = train(model, tokenizer, attached, FORGET, RETAIN, small_cfg())
    attached.detach()
    assert all(math.isfinite(x) for x in result.losses)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_base_requires_grad_and_mode_are_restored():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    train(model, tokenizer, attached, FORGET, RETAIN, small_cfg())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_finite_losses(method):
    _, attached, result = run("llama", method=method)
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert all(math.isfinite(x) for x in result.losses)
    assert all(math.isfinite(v) for terms in result.terms for v in terms.values())
    attached.detach()


def test_eul_raises_the_forget_loss_on_a_tiny_model():
    # a random tiny model is already near uniform (5.6 nats over 259 tokens): lift the caps above that
    _, attached, result = run(steps=15, lr=3e-2, objective={"nll_cap": 10.0, "kl_cap": 10.0})
    attached.detach()
    assert result.terms[-1]["nll_forget"] > result.terms[0]["nll_forget"]


def test_same_seed_gives_identical_training():
    _, first_layer, first = run(seed=7)
    first_state = first_layer.state_dict()
    first_layer.detach()
    _, second_layer, second = run(seed=7)
    assert first.losses == second.losses
    assert all(torch.equal(first_state[k], v) for k, v in second_layer.state_dict().items())
    second_layer.detach()


def test_progress_is_reported_every_step():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    seen: list[Progress] = []
    train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(), on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3]
    assert all(p.total == STEPS and math.isfinite(p.loss) and p.eta_seconds >= 0 for p in seen)
    assert seen[-1].eta_seconds == 0
    assert "nll_forget" in seen[-1].terms


def test_should_stop_raises_cancelled_and_stops_stepping():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    flags = [p.requires_grad for p in model.parameters()]
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    seen: list[Progress] = []
    with pytest.raises(Cancelled):
        train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(steps=10), on_progress=seen.append,
              should_stop=lambda: len(seen) >= 2)
    assert len(seen) == 2
    assert [p.requires_grad for p in model.parameters()] == flags  # the base is unfrozen again


def test_empty_forget_or_retain_is_refused():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    with pytest.raises(ValueError, match="forget"):
        train(model, tokenizer, attached, [], RETAIN, small_cfg())
    with pytest.raises(ValueError, match="retain"):
        train(model, tokenizer, attached, FORGET, [], small_cfg())
    attached.detach()


def test_logits_are_trimmed_to_scored_positions_without_changing_the_loss():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, LayerConfig(bottleneck_dim=8), seed=0)
    with torch.no_grad():
        for p in attached.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # student != teacher, so the KL terms are not zero
    pairs = [Example(prompt="A long question about things?", answer="Yes."), Example(prompt="Q?", answer="No")]
    batch = collate(encode(tokenizer, pairs, 64), pad_id(tokenizer))
    objective = get_objective("eul")
    trimmed, gate_term = forward_streams(model, attached, objective, {FORGET_S: batch, RETAIN_S: batch},
                                         torch.device("cpu"))
    assert gate_term is None  # an ungated layer
    assert trimmed[FORGET_S].student.shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with attached.disabled():
            teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    stream = Stream(full, batch["labels"], batch["attention_mask"], teacher)
    expected = objective(ObjectiveInputs({FORGET_S: stream, RETAIN_S: stream})).total
    assert objective(trimmed).total.item() == pytest.approx(expected.item(), rel=1e-5)
    attached.detach()


def test_answer_vocabulary_holds_the_scored_tokens_of_retain_answers_only():
    tokenizer = tiny_tokenizer()
    vocabulary = set(answer_vocabulary(tokenizer, [Example(prompt="Zebra question?", answer="Blue.")], 64).tolist())
    (item,) = encode(tokenizer, [Example(prompt="Zebra question?", answer="Blue.")], 64)
    assert vocabulary == {label for label in item["labels"] if label != IGNORE_INDEX}
    assert not set(tokenizer("Zebra question?")["input_ids"]) <= vocabulary  # prompt tokens are not in it


def test_forget_tokens_that_occur_in_retain_answers_are_marked_shared():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    forget = collate(encode(tokenizer, [Example(prompt="Q?", answer="Blue sky")], 64), pad_id(tokenizer))
    retain = collate(encode(tokenizer, [Example(prompt="Q?", answer="Blue.")], 64), pad_id(tokenizer))
    vocabulary = answer_vocabulary(tokenizer, [Example(prompt="Q?", answer="Blue.")], 64)
    inputs, _ = forward_streams(model, attached, get_objective("eul"), {FORGET_S: forget, RETAIN_S: retain},
                                torch.device("cpu"), vocabulary)
    stream = inputs[FORGET_S]
    marked = {int(t) for t, s in zip(stream.labels[0], stream.shared[0]) if s}
    blue = tokenizer("Blue", add_special_tokens=False)["input_ids"][0]
    sky = tokenizer(" sky", add_special_tokens=False)["input_ids"][0]
    assert blue in marked and sky not in marked
    assert inputs[RETAIN_S].shared is None
    attached.detach()
