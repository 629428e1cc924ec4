"""Each objective's loss equals the paper's formula computed by hand on tiny fixed logits."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.config import METHODS
from workers.engine.objectives import (
    FORGET,
    IGNORE_INDEX,
    MISMATCH,
    OBJECTIVES,
    REFUSAL,
    RETAIN,
    RETAIN_REFUSAL,
    EULWeights,
    GAKLWeights,
    IDKAPWeights,
    MEGDWeights,
    NPOWeights,
    ObjectiveInputs,
    SimNPOWeights,
    Stream,
    UNDIALWeights,
    get_objective,
)
from workers.engine.objectives.base import (
    kl_uniform_to_model,
    mean_kl,
    mean_nll,
    sequence_nll,
    token_entropy,
)

V = 5


def fixed_logits(seed: int, batch: int = 2, length: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, V, generator=generator) * 2  # (B, T, V)


# Labels: row 0 scores tokens 2 and 3 (a pair: prompt = tokens 0, 1); row 1 is text padded after token 2.
LABELS = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [4, 0, 2, IGNORE_INDEX]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
# Scored (row, predicting position, target) triples after the causal shift: logits[t] predict labels[t+1].
SCORED = [(0, 1, 3), (0, 2, 1), (1, 0, 0), (1, 1, 2)]


def stream(seed: int, teacher_seed: int | None = None, labels=LABELS) -> Stream:
    teacher = fixed_logits(teacher_seed) if teacher_seed is not None else None
    return Stream(fixed_logits(seed), labels, MASK, teacher)


def log_softmax(row: torch.Tensor) -> torch.Tensor:
    return row - torch.logsumexp(row, dim=-1)


def hand_nll(logits, triples=SCORED) -> float:
    return sum(-log_softmax(logits[b, t])[y].item() for b, t, y in triples) / len(triples)


def hand_kl_token(teacher, student, b, t) -> float:
    p, q = log_softmax(teacher[b, t]), log_softmax(student[b, t])
    return float((p.exp() * (p - q)).sum())


def hand_seq_nll(logits, row) -> float:
    return sum(-log_softmax(logits[b, t])[y].item() for b, t, y in SCORED if b == row)


# ---- building blocks --------------------------------------------------------------------------------


def test_mean_nll_scores_only_labelled_tokens():
    logits = fixed_logits(0)
    assert mean_nll(logits, LABELS).item() == pytest.approx(hand_nll(logits), rel=1e-5)


def test_mean_nll_matches_torch_cross_entropy():
    logits = fixed_logits(1)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), LABELS[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert mean_nll(logits, LABELS).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mean_nll_of_nothing_scored_is_zero_not_nan():
    labels = torch.full_like(LABELS, IGNORE_INDEX)
    assert mean_nll(fixed_logits(0), labels).item() == 0.0


def test_sequence_nll_sums_per_row():
    logits = fixed_logits(2)
    got = sequence_nll(logits, LABELS)
    assert got.tolist() == pytest.approx([hand_seq_nll(logits, 0), hand_seq_nll(logits, 1)], rel=1e-5)


def test_kl_is_teacher_to_student_on_scored_tokens():
    teacher, student = fixed_logits(3), fixed_logits(4)
    expected = sum(hand_kl_token(teacher, student, b, t) for b, t, _ in SCORED) / len(SCORED)
    assert mean_kl(teacher, student, LABELS).item() == pytest.approx(expected, rel=1e-5)
    assert mean_kl(teacher, teacher, LABELS).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_of_uniform_is_log_vocab():
    assert token_entropy(torch.zeros(1, 2, V))[0].tolist() == pytest.approx([math.log(V)] * 2, rel=1e-6)


def test_kl_uniform_to_model_by_hand():
    logits = fixed_logits(5)
    kl, mask = kl_uniform_to_model(logits, LABELS)
    b, t, _ = SCORED[0]
    logp = log_softmax(logits[b, t])
    expected = float((torch.full((V,), 1.0 / V) * (math.log(1.0 / V) - logp)).sum())
    assert kl[b, t].item() == pytest.approx(expected, rel=1e-5)
    assert int(mask.sum()) == len(SCORED)


# ---- objectives -------------------------------------------------------------------------------------


def test_registry_lists_every_configured_method():
    assert [get_objective(m).name for m in METHODS] == list(METHODS)
    assert tuple(OBJECTIVES) == METHODS  # same names, same order
    with pytest.raises(ValueError, match="unknown unlearning method"):
        get_objective("nope")


def test_weight_overrides_apply_and_unknown_names_fail():
    assert get_objective("eul").weights({"nll_cap": 3}).nll_cap == 3.0
    with pytest.raises(ValueError, match="no weight"):
        get_objective("eul").weights({"typo": 1.0})


def test_eul_matches_hand_computed_value():
    forget, retain = stream(10, teacher_seed=11), stream(12, teacher_seed=13)
    w = EULWeights(kl_retain=1.0, kl_forget=0.5, lm_retain=2.0, lm_forget=0.7, kl_cap=1e9, nll_cap=1e9)
    out = get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)

    kl_retain = sum(hand_kl_token(retain.teacher, retain.student, b, t) for b, t, _ in SCORED) / len(SCORED)
    kl_forget = sum(hand_kl_token(forget.teacher, forget.student, b, t) for b, t, _ in SCORED) / len(SCORED)
    expected = kl_retain - 0.5 * kl_forget + 2.0 * hand_nll(retain.student) - 0.7 * hand_nll(forget.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["nll_forget"] == pytest.approx(hand_nll(forget.student), rel=1e-5)


def test_eul_caps_bound_the_negated_terms_per_token():
    forget, retain = stream(10, teacher_seed=11), stream(12, teacher_seed=13)
    cap = 1.0
    w = EULWeights(kl_retain=0.0, kl_forget=0.0, lm_retain=0.0, lm_forget=1.0, nll_cap=cap, pull_back=0.0)
    out = get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)
    capped = [min(-log_softmax(forget.student[b, t])[y].item(), ceiling(forget.teacher, b, t, y, cap))
              for b, t, y in SCORED]
    assert out.total.item() == pytest.approx(-sum(capped) / len(capped), rel=1e-5)
    assert out.total.item() >= -max(ceiling(forget.teacher, b, t, y, cap) for b, t, y in SCORED)


def ceiling(teacher, b, t, y, cap) -> float:
    """The per-token NLL target: the cap, or the teacher's own NLL where that is already higher."""
    return max(cap, -log_softmax(teacher[b, t])[y].item())


def test_eul_capped_term_has_no_gradient_once_past_the_cap():
    student = torch.full((1, 2, V), 0.0)
    student[0, 0, 1] = -50.0  # the scored target token is now very unlikely: NLL ~ 50 > cap, KL ~ 10 > cap
    student.requires_grad_(True)
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    forget = Stream(student, labels, torch.ones(1, 2), torch.zeros(1, 2, V))  # the teacher: NLL log V
    retain = Stream(torch.zeros(1, 2, V), labels, torch.ones(1, 2), torch.zeros(1, 2, V))
    w = EULWeights(kl_retain=0.0, kl_forget=1.0, lm_retain=0.0, lm_forget=1.0, kl_cap=8.0, nll_cap=8.0,
                   pull_back=0.0)
    get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w).total.backward()
    assert student.grad.abs().max().item() == 0.0


def test_eul_pull_back_targets_the_cap_from_both_sides():
    """With pull_back = 1 the NLL part is d * mean_t |NLL_t - cap| - d * cap: minimal at NLL_t = cap."""
    forget, retain = stream(10, teacher_seed=11), stream(12, teacher_seed=13)
    cap = 2.5
    w = EULWeights(kl_retain=0.0, kl_forget=0.0, lm_retain=0.0, lm_forget=1.0, nll_cap=cap, pull_back=1.0)
    out = get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)
    nlls = [-log_softmax(forget.student[b, t])[y].item() for b, t, y in SCORED]
    caps = [ceiling(forget.teacher, b, t, y, cap) for b, t, y in SCORED]
    assert any(x > c for x, c in zip(nlls, caps)) and any(x < c for x, c in zip(nlls, caps))  # both sides
    expected = sum(abs(x - c) - c for x, c in zip(nlls, caps)) / len(nlls)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_eul_pull_back_makes_an_overshooting_token_likelier_again():
    student = torch.zeros(1, 2, V)
    student[0, 0, 1] = -50.0  # target NLL ~ 50, far past the cap; the teacher's is log V
    student.requires_grad_(True)
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    forget = Stream(student, labels, torch.ones(1, 2), torch.zeros(1, 2, V))
    retain = Stream(torch.zeros(1, 2, V), labels, torch.ones(1, 2), torch.zeros(1, 2, V))
    w = EULWeights(kl_retain=0.0, kl_forget=0.0, lm_retain=0.0, lm_forget=1.0, nll_cap=2.0, pull_back=1.0)
    get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w).total.backward()
    assert student.grad[0, 0, 1].item() < 0  # gradient descent raises the target's logit


def test_eul_never_makes_a_forget_token_the_base_already_finds_unlikely_likelier():
    """An answer token the base model gives NLL 50 (the request's wording is not how the model says it)
    is neither pushed nor pulled back toward the cap: nothing teaches the model the text to forget."""
    student = torch.zeros(1, 2, V)
    student[0, 0, 1] = -50.0
    student.requires_grad_(True)
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    forget = Stream(student, labels, torch.ones(1, 2), student.detach())  # student == teacher at step 0
    retain = Stream(torch.zeros(1, 2, V), labels, torch.ones(1, 2), torch.zeros(1, 2, V))
    w = EULWeights(kl_retain=0.0, kl_forget=0.0, lm_retain=0.0, lm_forget=1.0, nll_cap=2.0, pull_back=1.0)
    get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w).total.backward()
    assert student.grad[0, 0, 1].item() >= 0  # no step toward the target token


def shared_forget(shared: list[list[bool]]) -> Stream:
    forget = stream(40, teacher_seed=41)
    forget.shared = torch.tensor(shared)  # (B, T), aligned with LABELS
    return forget


def test_eul_weights_forget_tokens_shared_with_retain_answers_by_s():
    """With shared_token = s the forget terms are weighted means: s on a token that also occurs in a
    retain answer, 1 elsewhere. Here row 0's last token (position 2 predicts it) is shared."""
    forget = shared_forget([[False, False, False, True], [False, False, False, False]])
    retain = stream(42, teacher_seed=43)
    w = EULWeights(kl_retain=0.0, kl_forget=0.0, lm_retain=0.0, lm_forget=1.0, nll_cap=50.0, pull_back=0.0,
                   shared_token=0.25)
    out = get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)
    weights = [0.25 if (b, t) == (0, 2) else 1.0 for b, t, _ in SCORED]
    nlls = [-log_softmax(forget.student[b, t])[y].item() for b, t, y in SCORED]
    expected = -sum(x * c for x, c in zip(nlls, weights)) / sum(weights)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_eul_does_not_push_a_shared_forget_token_when_s_is_zero():
    forget = shared_forget([[False, False, False, True], [False, False, False, False]])
    forget.student.requires_grad_(True)
    retain = stream(42, teacher_seed=43)
    w = EULWeights(kl_retain=0.0, lm_retain=0.0, nll_cap=50.0, kl_cap=50.0, shared_token=0.0)
    get_objective("eul")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w).total.backward()
    assert forget.student.grad[0, 2].abs().max().item() == 0.0  # predicts the shared token
    assert forget.student.grad[0, 1].abs().max().item() > 0.0  # predicts a specific one


def test_eul_without_shared_marks_weighs_every_forget_token_alike():
    retain = stream(42, teacher_seed=43)
    w = EULWeights(shared_token=0.0)
    unmarked = get_objective("eul")(ObjectiveInputs({FORGET: stream(40, teacher_seed=41), RETAIN: retain}), w)
    plain = get_objective("eul")(ObjectiveInputs({FORGET: stream(40, teacher_seed=41), RETAIN: retain}),
                                 EULWeights())
    assert unmarked.total.item() == pytest.approx(plain.total.item(), rel=1e-6)


def test_ga_kl_matches_hand_computed_value():
    forget, mismatch, retain = stream(20), stream(21), stream(22, teacher_seed=23)
    w = GAKLWeights(forget=0.5, mismatch=1.0, kl_normal=2.0, nll_cap=float("inf"))
    inputs = ObjectiveInputs({FORGET: forget, MISMATCH: mismatch, RETAIN: retain})
    out = get_objective("ga_kl")(inputs, w)
    kl = sum(hand_kl_token(retain.teacher, retain.student, b, t) for b, t, _ in SCORED) / len(SCORED)
    expected = -0.5 * hand_nll(forget.student) + hand_nll(mismatch.student) + 2.0 * kl
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_me_gd_matches_hand_computed_value():
    forget, retain = stream(30), stream(31)
    out = get_objective("me_gd")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), MEGDWeights(0.1, 1.0))
    uniform = torch.full((V,), 1.0 / V)
    kl_u = [float((uniform * (uniform.log() - log_softmax(forget.student[b, t]))).sum()) for b, t, _ in SCORED]
    expected = 0.1 * sum(kl_u) / len(kl_u) + hand_nll(retain.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_me_gd_forget_term_is_zero_for_a_uniform_model():
    forget = Stream(torch.zeros(2, 4, V), LABELS, MASK)
    out = get_objective("me_gd")(ObjectiveInputs({FORGET: forget, RETAIN: stream(31)}), MEGDWeights(1.0, 0.0))
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)


def test_idk_ap_matches_hand_computed_value():
    refusal, retain, retain_refusal = stream(40), stream(41), stream(42)
    beta = 0.1
    inputs = ObjectiveInputs({REFUSAL: refusal, RETAIN: retain, RETAIN_REFUSAL: retain_refusal})
    out = get_objective("idk_ap")(inputs, IDKAPWeights(forget=1.0, retain=1.0, beta=beta))
    ap = 0.0
    for row in (0, 1):
        diff = hand_seq_nll(retain_refusal.student, row) - hand_seq_nll(retain.student, row)
        ap += -math.log(1.0 / (1.0 + math.exp(-beta * diff))) / beta
    expected = hand_nll(refusal.student) + ap / 2
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_npo_matches_hand_computed_value():
    forget, retain = stream(50, teacher_seed=51), stream(52)
    beta = 0.1
    out = get_objective("npo")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), NPOWeights(1.0, 0.5, beta))
    npo = 0.0
    for row in (0, 1):
        # log pi_theta(y|x) - log pi_ref(y|x) = NLL_ref - NLL_theta
        log_ratio = hand_seq_nll(forget.teacher, row) - hand_seq_nll(forget.student, row)
        npo += (2.0 / beta) * math.log(1.0 + math.exp(beta * log_ratio))
    expected = npo / 2 + 0.5 * hand_nll(retain.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_npo_at_the_reference_is_two_log_two_over_beta():
    forget = stream(50, teacher_seed=50)
    out = get_objective("npo")(ObjectiveInputs({FORGET: forget, RETAIN: stream(52)}), NPOWeights(1.0, 0.0, 0.1))
    assert out.total.item() == pytest.approx(2 * math.log(2) / 0.1, rel=1e-5)


def test_simnpo_matches_hand_computed_value():
    forget, retain = stream(60), stream(61)
    w = SimNPOWeights(forget=1.0, retain=0.5, beta=2.5, gamma=0.3)
    out = get_objective("simnpo")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)
    simnpo = 0.0
    for row in (0, 1):  # both rows score 2 tokens
        per_token = hand_seq_nll(forget.student, row) / 2
        simnpo += -(2.0 / w.beta) * math.log(1.0 / (1.0 + math.exp(-(w.beta * per_token - w.gamma))))
    expected = simnpo / 2 + 0.5 * hand_nll(retain.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_simnpo_needs_no_reference_model():
    assert get_objective("simnpo").teacher_streams == ()


def hand_undial_ce(teacher, student, b, t, y, beta) -> float:
    lowered = teacher[b, t].clone()
    lowered[y] -= beta
    target = torch.softmax(lowered, dim=-1)
    return float(-(target * log_softmax(student[b, t])).sum())


def test_undial_matches_hand_computed_value():
    forget, retain = stream(80, teacher_seed=81), stream(82, teacher_seed=83)
    w = UNDIALWeights(forget=1.0, kl_retain=2.0, lm_retain=0.5, beta=3.0, shared_token=1.0)
    out = get_objective("undial")(ObjectiveInputs({FORGET: forget, RETAIN: retain}), w)
    ce = sum(hand_undial_ce(forget.teacher, forget.student, b, t, y, 3.0) for b, t, y in SCORED) / len(SCORED)
    kl = sum(hand_kl_token(retain.teacher, retain.student, b, t) for b, t, _ in SCORED) / len(SCORED)
    expected = ce + 2.0 * kl + 0.5 * hand_nll(retain.student)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_undial_forget_term_is_smallest_at_the_adjusted_teacher():
    """Its minimum is a fixed target, not "as unlikely as possible": a student equal to the teacher with the
    label's logit lowered by beta has zero gradient there, and lowering it further costs more."""
    from workers.engine.objectives.undial import adjusted_targets, distillation_ce

    teacher = fixed_logits(90)
    at_target = teacher.clone()
    for b, t, y in SCORED:
        at_target[b, t, y] -= 3.0
    student = at_target.clone().requires_grad_(True)
    ce = distillation_ce(student, adjusted_targets(teacher, LABELS, 3.0), LABELS)
    (ce * (LABELS[:, 1:] != IGNORE_INDEX)).sum().backward()
    assert student.grad.abs().max().item() < 1e-5
    further = at_target.clone()
    for b, t, y in SCORED:
        further[b, t, y] -= 5.0
    assert distillation_ce(further, adjusted_targets(teacher, LABELS, 3.0), LABELS).sum() > ce.sum()


@pytest.mark.parametrize("method", METHODS)
def test_every_objective_is_differentiable_and_finite(method):
    objective = get_objective(method)
    streams, leaves = {}, []
    for i, name in enumerate(objective.streams):
        student = fixed_logits(60 + i).requires_grad_(True)
        teacher = fixed_logits(70 + i) if name in objective.teacher_streams else None
        hidden = teacher_hidden = None
        if objective.reads_hidden:  # embeddings + 2 blocks, (B, T, D=5) each
            hidden = tuple(fixed_logits(80 + 3 * i + k).requires_grad_(True) for k in range(3))
            teacher_hidden = tuple(fixed_logits(90 + 3 * i + k) for k in range(3))
        streams[name] = Stream(student, LABELS, MASK, teacher, hidden=hidden, teacher_hidden=teacher_hidden)
        leaves += [student, *(hidden or ())]
    out = objective(ObjectiveInputs(streams))
    out.total.backward()
    assert math.isfinite(out.total.item())
    assert all(math.isfinite(v) for v in out.terms.values())
    assert any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
