"""Who's Harry Potter (whp): generic labels by hand, the loss by hand, and the trainer's reinforce-relabel-reset
phase on tiny models (random, and one that has learnt the forget items)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import memorising_tiny_model
from tests.unit.test_objectives import SCORED, hand_kl_token, hand_nll, stream
from tests.unit.test_trainer import FORGET, RETAIN, SMALL_LAYER, STEPS, small_cfg
from workers.engine.batching import collate, encode, pad_id
from workers.engine.config import DEFAULT_METHOD, METHODS
from workers.engine.layers import create_attached
from workers.engine.objectives import FORGET as FORGET_S
from workers.engine.objectives import IGNORE_INDEX, ObjectiveInputs, WHPWeights, get_objective
from workers.engine.objectives import RETAIN as RETAIN_S
from workers.engine.objectives.base import mean_nll
from workers.engine.objectives.whp import generic_labels
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.trainer import Cancelled, Progress, frozen_base, generic_forget, relabelled, train

# ---- generic labels by hand: V = 4, one row of 4 tokens --------------------------------------------------
# logits[:, t] predict labels[:, t+1]: position 0 predicts the scored token 1 (the forget answer, "Ron"),
# position 1 the scored token 0, position 2 an unscored one; position 3 predicts nothing.
LABELS = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
BASE = torch.tensor([[[0.0, 3.0, 2.0, 0.0],  # argmax 1 (the answer), runner-up 2 by a margin of 1
                      [1.0, 0.0, 0.0, 2.0],  # argmax 3
                      [5.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0]]])  # (1, 4, V)
REINFORCED = torch.tensor([[[0.0, 4.0, 2.0, 0.0],  # the answer raised by 1
                            [1.0, 0.0, 0.0, 1.0],  # nothing raised (token 3 lowered)
                            [0.0, 0.0, 9.0, 0.0],  # token 2 raised, but it predicts an unscored token
                            [0.0, 0.0, 0.0, 0.0]]])


def test_a_token_the_reinforcement_raised_loses_to_the_base_runner_up():
    # generic = base - 5 * relu(reinforced - base) = [0, 3 - 5, 2, 0]: the runner-up 2 wins
    assert generic_labels(BASE, REINFORCED, LABELS, alpha=5.0)[0, 1].item() == 2


def test_a_raise_too_small_to_outweigh_the_base_margin_keeps_the_token():
    # alpha * raise = 0.5 < the margin 1 over the runner-up
    assert generic_labels(BASE, REINFORCED, LABELS, alpha=0.5)[0, 1].item() == 1


def test_where_the_reinforcement_raised_nothing_the_label_is_the_base_argmax():
    assert generic_labels(BASE, REINFORCED, LABELS, alpha=5.0)[0, 2].item() == 3  # not the original 0


def test_unscored_positions_stay_unscored():
    labels = generic_labels(BASE, REINFORCED, LABELS, alpha=5.0)
    assert labels[0, 0].item() == IGNORE_INDEX and labels[0, 3].item() == IGNORE_INDEX


# ---- the loss ------------------------------------------------------------------------------------------


def test_whp_loss_is_the_weighted_sum_of_its_terms():
    forget, retain = stream(100), stream(102, teacher_seed=103)  # forget's labels stand for generic ones
    w = WHPWeights(forget=0.7, kl_retain=2.0, lm_retain=0.5)
    out = get_objective("whp")(ObjectiveInputs({FORGET_S: forget, RETAIN_S: retain}), w)
    kl = sum(hand_kl_token(retain.teacher, retain.student, b, t) for b, t, _ in SCORED) / len(SCORED)
    expected = 0.7 * hand_nll(forget.student) + 2.0 * kl + 0.5 * hand_nll(retain.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms == pytest.approx({"nll_generic": hand_nll(forget.student), "kl_retain": kl,
                                       "nll_retain": hand_nll(retain.student)}, rel=1e-5)


def test_whp_is_registered_relabels_its_forget_stream_and_is_not_the_default():
    objective = get_objective("whp")
    assert "whp" in METHODS and DEFAULT_METHOD != "whp"
    assert objective.relabel is not None and objective.teacher_streams == (RETAIN_S,)
    assert "2310.02238" in objective.reference


# ---- the trainer's phase: reinforce, relabel, reset ----------------------------------------------------


def whp_phase(model, attached, cfg=None):
    """The forget items as generic_forget relabels them, run as train() runs it (base frozen)."""
    cfg, tokenizer = cfg or small_cfg(method="whp"), tiny_tokenizer()
    objective = get_objective("whp")
    with frozen_base(model, attached.trainable_parameters()):
        return generic_forget(model, attached, objective, objective.weights(cfg.objective),
                              encode(tokenizer, FORGET, cfg.max_length), cfg, torch.device("cpu"), pad_id(tokenizer))


def scored_labels(items) -> list[int]:
    return [label for item in items for label in item["labels"] if label != IGNORE_INDEX]


def test_the_layer_is_back_at_its_initial_weights_after_relabelling():
    model = tiny_model("llama")
    attached = create_attached(model, SMALL_LAYER, seed=0)
    initial = attached.state_dict()
    whp_phase(model, attached)
    assert all(torch.equal(initial[k], v) for k, v in attached.state_dict().items())
    attached.detach()


def test_relabelling_keeps_the_inputs_and_which_tokens_are_scored():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    original = encode(tokenizer, FORGET, small_cfg().max_length)
    items = whp_phase(model, attached)
    attached.detach()
    assert [i["input_ids"] for i in items] == [i["input_ids"] for i in original]
    assert [[y == IGNORE_INDEX for y in i["labels"]] for i in items] == \
           [[y == IGNORE_INDEX for y in i["labels"]] for i in original]


@pytest.fixture(scope="module")
def knowing(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama that has learnt the forget items (2 nats/token): its own predictions are mostly the
    forget answers, as a real model's are on what it knows (a random model predicts none of them)."""
    rows = [{"prompt": e.prompt, "answer": e.answer} if e.is_pair else {"text": e.text} for e in FORGET]
    path = memorising_tiny_model(tmp_path_factory.mktemp("knowing"), rows, target_nll=2.0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), tiny_tokenizer()


def matches(labels: list[int], answers: list[int]) -> int:
    return sum(label == answer for label, answer in zip(labels, answers))


def test_forget_answers_the_reinforcement_raised_are_replaced_in_the_labels(knowing):
    """Against the untrained layer (reinforced = base) the generic labels are the base's own predictions,
    mostly the answers; after reinforcing on the forget items the answers it raised lose to alternatives."""
    model, tokenizer = knowing
    # alpha 50, not 5: 3 steps on the tiny model raise the answers' logits by hundredths to tenths of a nat
    cfg = small_cfg(method="whp", objective={"alpha": 50.0})
    objective = get_objective("whp")
    attached = create_attached(model, SMALL_LAYER, seed=0)
    original = encode(tokenizer, FORGET, cfg.max_length)
    base_predictions = scored_labels(relabelled(model, attached, objective, objective.weights(cfg.objective),
                                                original, cfg, torch.device("cpu"), pad_id(tokenizer)))
    generic = scored_labels(whp_phase(model, attached, cfg))
    attached.detach()
    answers = scored_labels(original)
    assert matches(base_predictions, answers) > len(answers) / 2
    assert matches(generic, answers) < matches(base_predictions, answers)


def test_training_with_whp_makes_the_forget_answers_less_likely_and_counts_only_main_steps(knowing):
    model, tokenizer = knowing
    attached = create_attached(model, SMALL_LAYER, seed=0)
    before = forget_nll(model, tokenizer)
    result = train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(method="whp"))
    after = forget_nll(model, tokenizer)
    attached.detach()
    assert result.steps == STEPS and all(math.isfinite(x) for x in result.losses)
    assert after > before  # measured: 1.92 -> 1.96 nats/token


def forget_nll(model, tokenizer) -> float:
    """Mean NLL of the forget answers themselves (not the generic labels), the model as it is."""
    batch = collate(encode(tokenizer, FORGET, small_cfg().max_length), pad_id(tokenizer))
    with torch.no_grad():
        return mean_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["labels"]).item()


def test_reinforcement_steps_are_reported_as_step_zero_before_the_training_steps():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    seen: list[Progress] = []
    train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(method="whp"), on_progress=seen.append)
    attached.detach()
    assert [p.step for p in seen] == [0] * STEPS + list(range(1, STEPS + 1))
    assert all(math.isfinite(p.loss) and p.eta_seconds >= 0 for p in seen)


def test_cancelling_during_the_reinforcement_leaves_the_layer_at_its_initial_weights():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    initial = attached.state_dict()
    seen: list[Progress] = []
    with pytest.raises(Cancelled, match="reinforcement"):
        train(model, tokenizer, attached, FORGET, RETAIN, small_cfg(method="whp"), on_progress=seen.append,
              should_stop=lambda: len(seen) >= 2)
    assert all(torch.equal(initial[k], v) for k, v in attached.state_dict().items())
    attached.detach()
