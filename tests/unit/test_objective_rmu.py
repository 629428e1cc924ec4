"""Representation misdirection (rmu): the loss by hand on fixed activations, and the trainer filling the
streams' hidden states so that training on a tiny model turns the forget activations toward the direction."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_trainer import FORGET, RETAIN, SMALL_LAYER, small_cfg
from workers.engine.batching import collate, encode, pad_id
from workers.engine.config import DEFAULT_METHOD, METHODS
from workers.engine.layers import create_attached
from workers.engine.objectives import FORGET as FORGET_S
from workers.engine.objectives import IGNORE_INDEX, ObjectiveInputs, RMUWeights, Stream, get_objective
from workers.engine.objectives import RETAIN as RETAIN_S
from workers.engine.objectives.rmu import steered_block, steering_direction
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.trainer import forward_streams, frozen_base, train

D = 3
# One forget row of 4 positions: positions 1 and 2 predict scored tokens (labels[2], labels[3]).
FORGET_LABELS = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
RETAIN_MASK = torch.tensor([[1, 1, 1, 0]])  # the last retain position is padding


def activations(values) -> tuple[torch.Tensor, ...]:
    """hidden_states as HF returns them for a 2-block model: embeddings, block 0, block 1; (1, 4, D) each."""
    block = torch.tensor([values], dtype=torch.float32)
    return (torch.zeros_like(block), block, block * 2)


def streams(forget_student, forget_ref, retain_student, retain_ref) -> ObjectiveInputs:
    logits = torch.zeros(1, 4, 5)
    return ObjectiveInputs({
        FORGET_S: Stream(logits, FORGET_LABELS, torch.ones(1, 4), logits, hidden=forget_student,
                         teacher_hidden=forget_ref),
        RETAIN_S: Stream(logits, torch.full((1, 4), 1), RETAIN_MASK, logits, hidden=retain_student,
                         teacher_hidden=retain_ref),
    })


REF = [[1.0, 0.0, 0.0], [0.0, 3.0, 4.0], [0.0, 0.0, 2.0], [9.0, 9.0, 9.0]]  # norms at positions 1, 2: 5 and 2


def test_rmu_is_registered_reads_hidden_states_and_is_not_the_default():
    objective = get_objective("rmu")
    assert "rmu" in METHODS and DEFAULT_METHOD != "rmu"
    assert objective.reads_hidden and objective.teacher_streams == (FORGET_S, RETAIN_S)
    assert "2403.03218" in objective.reference


def test_the_steered_block_is_the_depth_fraction_of_the_blocks_at_least_the_first():
    hidden = tuple(torch.zeros(1) for _ in range(31))  # embeddings + 30 blocks
    assert steered_block(hidden, 0.25) == 8  # hidden_states[8]: the output of block 7, as the paper's layer 7
    assert steered_block(hidden, 0.0) == 1 and steered_block(hidden, 1.0) == 30
    assert steered_block(activations(REF), 0.25) == 1


def test_the_direction_is_a_fixed_unit_vector_per_seed():
    u = steering_direction(D, 0, torch.device("cpu"))
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()
    assert torch.equal(u, steering_direction(D, 0, torch.device("cpu")))
    assert not torch.equal(u, steering_direction(D, 1, torch.device("cpu")))


def test_the_loss_matches_a_hand_computation():
    w = RMUWeights(forget=1.0, retain=2.0, beta=2.0, depth=0.25)
    student = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0]]
    out = get_objective("rmu")(streams(activations(student), activations(REF), activations(student),
                                       activations(REF)), w)
    u = steering_direction(D, 0, torch.device("cpu"))
    c = 2.0 * (5.0 + 2.0) / 2  # beta times the mean reference norm at the answer-predicting positions 1, 2
    misdirect = sum(float(((torch.tensor(student[t]) - c * u) ** 2).sum()) for t in (1, 2)) / 2 / c ** 2
    drift = [float(((torch.tensor(student[t]) - torch.tensor(REF[t])) ** 2).sum() / (torch.tensor(REF[t]) ** 2).sum())
             for t in (0, 1, 2)]  # position 3 is padding
    assert out.total.item() == pytest.approx(misdirect + 2.0 * sum(drift) / 3, rel=1e-5)
    assert out.terms["block"] == 0.0


def test_activations_on_the_direction_and_unchanged_retain_activations_cost_nothing():
    w = RMUWeights(beta=2.0, depth=0.25)
    c = 2.0 * 3.5
    on_direction = [[0.0] * D] + [(c * steering_direction(D, 0, torch.device("cpu"))).tolist()] * 2 + [[0.0] * D]
    out = get_objective("rmu")(streams(activations(on_direction), activations(REF), activations(REF),
                                       activations(REF)), w)
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)
    assert out.terms["cos_to_direction"] == pytest.approx(1.0)


# ---- through the trainer, on a tiny model -------------------------------------------------------------


def forget_alignment(model, attached, cfg) -> float:
    """cos(h_l, u) at the forget answers' predicting positions, the model as it is (the loss's own term)."""
    objective, tokenizer = get_objective("rmu"), tiny_tokenizer()
    batch = {name: collate(encode(tokenizer, items, cfg.max_length), pad_id(tokenizer))
             for name, items in ((FORGET_S, FORGET), (RETAIN_S, RETAIN))}
    with torch.no_grad():
        inputs, _ = forward_streams(model, attached, objective, batch, torch.device("cpu"))
    return objective(inputs, objective.weights(cfg.objective)).terms["cos_to_direction"]


def test_the_trainer_gives_every_stream_all_block_outputs_on_student_and_base():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    attached = create_attached(model, SMALL_LAYER, seed=0)
    batch = {FORGET_S: collate(encode(tokenizer, FORGET, 64), pad_id(tokenizer))}
    with torch.no_grad():
        inputs, _ = forward_streams(model, attached, get_objective("rmu"), batch, torch.device("cpu"))
    attached.detach()
    forget = inputs[FORGET_S]
    assert len(forget.hidden) == len(forget.teacher_hidden) == model.config.num_hidden_layers + 1
    assert forget.hidden[1].shape[:2] == forget.labels.shape  # aligned with the kept positions


def test_training_with_rmu_turns_the_forget_activations_toward_the_direction():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    cfg = small_cfg(method="rmu", steps=10)
    attached = create_attached(model, SMALL_LAYER, seed=0)
    with frozen_base(model, attached.trainable_parameters()):
        before = forget_alignment(model, attached, cfg)
        result = train(model, tokenizer, attached, FORGET, RETAIN, cfg)
        after = forget_alignment(model, attached, cfg)
    attached.detach()
    assert result.steps == 10 and all(math.isfinite(x) for x in result.losses)
    assert after > before + 0.05, (before, after)  # measured: -0.06 -> about 0.0 (lr 1e-2)

