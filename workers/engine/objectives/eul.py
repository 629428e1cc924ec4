"""EUL objective: Chen & Yang 2023, "Unlearn What You Want to Forget: Efficient Unlearning for LLMs"
(arXiv 2310.20150), section 3.2, with the two negated terms bounded and weighted by specificity.

Paper:  L_EUL = L_KL + lambda * L_TASK - gamma * L_LM, where
        L_KL   = sum_retain KL(F(x) || F'(x)) - sum_forget KL(F(x) || F'(x))   (F frozen teacher, F' student)
        L_TASK = task loss on retain,   L_LM = language-model loss on forget.

Here:   L = a * KL_r - b * <min(KL_f,t, kl_cap)>_w + c * NLL_r - d * <min(NLL_f,t, n_t)>_w
            + p * (b * <relu(KL_f,t - kl_cap)>_w + d * <relu(NLL_f,t - n_t)>_w),
        n_t = max(nll_cap, NLL_teacher,t)   (a token the base already finds unlikely is left alone)
        <x_t>_w = sum_t w_t x_t / sum_t w_t,  w_t = s if forget token t also occurs in a retain answer, else 1

Every term is a mean over scored tokens (answers of pairs, all of a free text). The negated forget
terms are bounded: a forget token stops being pushed once its NLL (or KL to the teacher) reached the
cap, and with the pull-back p = 1 a token that overshot the cap (dragged along by its neighbours) is
pulled back to it, so each forget term is d * mean_t |NLL_f,t - cap| up to a constant: the target is
"as unlikely as an answer the model never knew", not "as unlikely as possible". Unbounded gradient
ascent has no floor: measured by the team on SmolLM2-135M it drives forget NLL past 190 nats in 30
steps and wrecks the model everywhere.

Defaults, measured on SmolLM2-135M-Instruct (bottleneck r=32, lr 1e-3, batch 4; forget = 10 world
facts it knows; held out = 20 other facts never trained on; retain = the built-in generic set,
optionally + 24 further facts; a=4, b=0.25, c=d=1; mean answer NLL, nats/token, before 0.59 / 0.68):

    retain          steps  caps  p    forget after   held-out after
    generic + facts   20    2    0       3.27            1.10
    generic + facts   20    3    1       1.76            0.95     <- defaults
    generic + facts   40    2    1       1.55            0.87
    generic only      40    2    0       9.62            5.45     (overshoot: collateral damage)
    generic only      40    3    1       2.64            1.70
    generic only      40    2    1       1.59            1.17     (p on the NLL term only)

(This table predates the specificity weight below, i.e. s = 1; with s = 0.2 the engine e2e, 20 steps,
generic + facts, measures forget 0.59 -> 1.13 and held-out 0.68 -> 0.70.)

Reference levels on the base model: answers to world facts it gets wrong 1.13 nats/token, TOFU's
fictitious-author answers 2.19. Without the pull-back, forget tokens overshoot far past the cap and
similar facts go with them; with it the forget set lands at the "never knew it" level. Forgetting
and collateral damage trade at roughly 4-7 to 1 with a retain set that resembles the forget data and
much worse without one: configure an operator retain corpus (Settings.retain_corpus).

Specificity weight s (shared_token): a forget answer restates its question in generic wording ("The
Eiffel Tower is located in Paris, France."); pushing "The", "is located in" as hard as "Eiffel Tower
Paris" teaches the model to avoid that wording everywhere, and facts phrased the same way go with it.
The trainer marks forget tokens that also occur in a retain answer; they count s. Measured through
train_request + fuse + served_model on SmolLM2-135M (forget one world fact, 40 steps, retain = 24
world-fact questions the model answers itself + 8 generic; kept = of the 36 other world facts it
answered before, how many it still answers, greedy, one prompt at a time):

    target      s     forget answer still given   kept (first 10)   kept (all 36)
    Eiffel     1.0             no                       7                30
    Eiffel     0.2             no                      10                31     <- default
    Eiffel     0.0             no                       9                31     (forget NLL 1.22 vs 2.34 at 0.2)
    Colosseum  1.0             no                       9                31
    Colosseum  0.2             no                       8                31

A small gain, not a cure: over all 36 facts it is one fact for one target and none for the other, and
which facts are lost shifts with the setting (the Red Planet, the Olympic Games' city, the Sistine
Chapel: each drifts into a rambling answer, "The Red Planet is actually a planet in the habitable
zone ..."). It stays the default because both targets were forgotten and at least as many of the 36
were kept. Tried and not adopted (Eiffel): kl_retain 8 (kept 28 of the first 30 other facts, 8 of the
first 10, batched evaluation), and a retain Gram term in the fusion regression (the fused layer pulled
toward zero output on retain inputs, s = 0.2): kept 31 -> 33 -> 35 of 36 as its weight grew, but the
forget NLL fell with it (2.34 -> 1.68 -> 1.25) and at the strongest setting the answer came back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    FORGET,
    RETAIN,
    LossOutput,
    Objective,
    ObjectiveInputs,
    capped,
    masked_mean,
    mean_kl,
    mean_nll,
    scalar,
    specificity_weights,
    token_kl,
    token_nll,
)


@dataclass(frozen=True)
class EULWeights:
    kl_retain: float = 4.0  # a
    kl_forget: float = 0.25  # b
    lm_retain: float = 1.0  # c
    lm_forget: float = 1.0  # d
    kl_cap: float = 3.0  # nats per token
    nll_cap: float = 3.0  # nats per token
    pull_back: float = 1.0  # p: weight of the overshoot terms that draw forget tokens back to the caps
    shared_token: float = 0.2  # s: weight of a forget token that also occurs in a retain answer


@torch.no_grad()
def nll_ceiling(teacher_logits: Tensor, labels: Tensor, cap: float) -> Tensor:
    """Per-token NLL target max(cap, teacher NLL), (B, T-1): a forget token the base model already finds
    less likely than the cap is left where it is. A flat cap would pull such a token back *down* to the
    cap, teaching the model the very answer it is asked to forget (measured: a one-word answer at 9.7
    nats/token fell to 2.5 with the flat cap)."""
    teacher_nll, _ = token_nll(teacher_logits, labels)
    return teacher_nll.clamp_min(cap)


def eul_loss(inputs: ObjectiveInputs, w: EULWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]

    kl_retain = mean_kl(retain.teacher, retain.student, retain.labels)
    kl_f, _ = token_kl(forget.teacher, forget.student, forget.labels)
    token_w = specificity_weights(forget, w.shared_token)  # (B, T-1): 0 unscored, s shared, 1 else
    kl_forget = masked_mean(capped(kl_f, w.kl_cap), token_w)
    lm_retain = mean_nll(retain.student, retain.labels)
    nll_f, _ = token_nll(forget.student, forget.labels)
    nll_cap = nll_ceiling(forget.teacher, forget.labels, w.nll_cap)  # (B, T-1)
    # where, not min/clamp: at a tie (every token the base finds unlikely, at step 0) both have gradient 0
    lm_forget = masked_mean(torch.where(nll_f < nll_cap, nll_f, nll_cap), token_w)
    nll_over = masked_mean(torch.where(nll_f > nll_cap, nll_f - nll_cap, 0.0), token_w)
    kl_over = masked_mean((kl_f - w.kl_cap).clamp_min(0.0), token_w)

    total = w.kl_retain * kl_retain - w.kl_forget * kl_forget + w.lm_retain * lm_retain - w.lm_forget * lm_forget
    if w.pull_back:
        total = total + w.pull_back * (w.lm_forget * nll_over + w.kl_forget * kl_over)
    return LossOutput(
        total,
        {
            "kl_retain": scalar(kl_retain),
            "kl_forget": scalar(masked_mean(kl_f, token_w)),  # uncapped: how far the forget set moved
            "nll_retain": scalar(lm_retain),
            "nll_forget": scalar(masked_mean(nll_f, token_w)),
        },
    )


EUL = Objective(
    name="eul",
    loss=eul_loss,
    weights_type=EULWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(FORGET, RETAIN),
    reference="Chen & Yang 2023, arXiv 2310.20150",
)
