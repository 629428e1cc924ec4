"""Gradient ascent + random mismatch + KL on normal data: Yao et al. 2023, "Large Language Model
Unlearning" (arXiv 2310.10683), eq. 2-5.

    L = e1 * L_fgt + e2 * L_rdn + e3 * L_nor
    L_fgt = -NLL(forget answers)                        gradient ascent on the forget set
    L_rdn = NLL(random retain responses | forget prompts)  mismatch: forget prompts get unrelated answers
    L_nor = KL(F_orig(x) || F_theta(x)) on normal data     stay close to the original model

Paper weights e1 = 0.5, e2 = 1, e3 = 1. The ascent term here is capped per token at nll_cap (the same
hinge as eul, see eul.py for why); nll_cap = inf gives the paper's unbounded form.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    FORGET,
    MISMATCH,
    RETAIN,
    LossOutput,
    Objective,
    ObjectiveInputs,
    capped,
    masked_mean,
    mean_kl,
    mean_nll,
    scalar,
    token_nll,
)


@dataclass(frozen=True)
class GAKLWeights:
    forget: float = 0.5  # e1
    mismatch: float = 1.0  # e2
    kl_normal: float = 1.0  # e3
    nll_cap: float = 3.0


def ga_kl_loss(inputs: ObjectiveInputs, w: GAKLWeights) -> LossOutput:
    forget, mismatch, normal = inputs[FORGET], inputs[MISMATCH], inputs[RETAIN]

    nll_f, mask = token_nll(forget.student, forget.labels)
    ascent = masked_mean(capped(nll_f, w.nll_cap), mask)
    mismatch_nll = mean_nll(mismatch.student, mismatch.labels)
    kl_normal = mean_kl(normal.teacher, normal.student, normal.labels)

    total = -w.forget * ascent + w.mismatch * mismatch_nll + w.kl_normal * kl_normal
    return LossOutput(
        total,
        {"nll_forget": scalar(ascent), "nll_mismatch": scalar(mismatch_nll), "kl_retain": scalar(kl_normal)},
    )


GA_KL = Objective(
    name="ga_kl",
    loss=ga_kl_loss,
    weights_type=GAKLWeights,
    streams=(FORGET, RETAIN, MISMATCH),
    teacher_streams=(RETAIN,),
    reference="Yao et al. 2023, arXiv 2310.10683",
)
