"""UNDIAL: Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
Language Models" (arXiv 2402.10052), eq. 2-3, with EUL's retain terms and specificity weight.

    target_t = softmax(z_teacher,t - beta * onehot(y_t))            (the base's own prediction, the
                                                                    forgotten token's logit lowered)
    L_forget = <CE(target_t, p_theta,t)>_w = <-sum_v target_t(v) log p_theta,t(v)>_w
    L = g * L_forget + a * KL_r + c * NLL_r
    <x_t>_w = sum_t w_t x_t / sum_t w_t,  w_t = s if forget token t also occurs in a retain answer, else 1

Unlike gradient ascent the forget term is a distillation toward a fixed, bounded target: it has a
minimum (the student equals the adjusted teacher), moves only the one token's probability mass and keeps
the rest of the base's next-token distribution, which is why the paper reports it stays stable where
GA/NPO collapse. Paper / open-unlearning: beta = 10 (the "strength"), retain NLL weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    FORGET,
    RETAIN,
    LossOutput,
    Objective,
    ObjectiveInputs,
    masked_mean,
    mean_kl,
    mean_nll,
    scalar,
    shift,
    specificity_weights,
    token_nll,
)


@dataclass(frozen=True)
class UNDIALWeights:
    forget: float = 1.0  # g
    kl_retain: float = 4.0  # a
    lm_retain: float = 1.0  # c
    beta: float = 10.0  # how far the forgotten token's logit is lowered in the target
    shared_token: float = 0.2  # s


@torch.no_grad()
def adjusted_targets(teacher_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """softmax(teacher logits with beta subtracted at each label), (B, T-1, V), aligned with shift()."""
    logits, targets = shift(teacher_logits.float(), labels)
    lowered = logits.scatter_add(-1, targets.clamp_min(0).unsqueeze(-1),
                                 torch.full_like(logits[..., :1], -beta))  # (B, T-1, V)
    return F.softmax(lowered, dim=-1)


def distillation_ce(student_logits: Tensor, target_probs: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy -sum_v target(v) log p_student(v), (B, T-1)."""
    logits, _ = shift(student_logits, labels)
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def undial_loss(inputs: ObjectiveInputs, w: UNDIALWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]
    targets = adjusted_targets(forget.teacher, forget.labels, w.beta)
    token_w = specificity_weights(forget, w.shared_token)  # (B, T-1): 0 unscored, s shared, 1 else
    l_forget = masked_mean(distillation_ce(forget.student, targets, forget.labels), token_w)
    kl_retain = mean_kl(retain.teacher, retain.student, retain.labels)
    lm_retain = mean_nll(retain.student, retain.labels)
    total = w.forget * l_forget + w.kl_retain * kl_retain + w.lm_retain * lm_retain
    nll_f, _ = token_nll(forget.student, forget.labels)
    return LossOutput(total, {"undial": scalar(l_forget), "kl_retain": scalar(kl_retain),
                              "nll_retain": scalar(lm_retain), "nll_forget": scalar(masked_mean(nll_f, token_w))})


UNDIAL = Objective(
    name="undial",
    loss=undial_loss,
    weights_type=UNDIALWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(FORGET, RETAIN),
    reference="Dong et al. 2024, arXiv 2402.10052",
)
