"""Refusal targets + answer preservation: Yuan et al. 2024, "A Closer Look at Machine Unlearning for
Large Language Models" (arXiv 2410.08109), section 4.2 (targeted unlearning).

    L = a * NLL(y_idk | x_forget)  +  c * L_AP
    L_AP = -(1/beta) E_retain[ log sigmoid( -beta * log( pi(y_idk | x) / pi(y | x) ) ) ]
         = -(1/beta) E_retain[ log sigmoid( beta * (NLL_seq(y_idk | x) - NLL_seq(y | x)) ) ]

y_idk is a random sentence from resources/refusals.txt. The AP term keeps the retain answer y more
likely than a refusal on the same retain prompt, so the model does not learn to refuse everything; the
refusal on the retain prompt is batched in the RETAIN_REFUSAL stream, aligned row by row with RETAIN.
Paper weights a = 1, c = 1, beta = 0.1 (sequence-summed NLLs, as in the paper's code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import (
    REFUSAL,
    RETAIN,
    RETAIN_REFUSAL,
    LossOutput,
    Objective,
    ObjectiveInputs,
    mean_nll,
    scalar,
    sequence_nll,
)


@dataclass(frozen=True)
class IDKAPWeights:
    forget: float = 1.0  # a
    retain: float = 1.0  # c
    beta: float = 0.1


def answer_preservation(answer_nll: Tensor, refusal_nll: Tensor, beta: float) -> Tensor:
    """-(1/beta) mean log sigmoid(beta * (NLL(refusal) - NLL(answer))), per-sequence NLLs (B,)."""
    return -F.logsigmoid(beta * (refusal_nll - answer_nll)).mean() / beta


def idk_ap_loss(inputs: ObjectiveInputs, w: IDKAPWeights) -> LossOutput:
    refusal, retain, retain_refusal = inputs[REFUSAL], inputs[RETAIN], inputs[RETAIN_REFUSAL]
    idk = mean_nll(refusal.student, refusal.labels)
    ap = answer_preservation(
        sequence_nll(retain.student, retain.labels),
        sequence_nll(retain_refusal.student, retain_refusal.labels),
        w.beta,
    )
    total = w.forget * idk + w.retain * ap
    return LossOutput(total, {"nll_refusal": scalar(idk), "answer_preservation": scalar(ap)})


IDK_AP = Objective(
    name="idk_ap",
    loss=idk_ap_loss,
    weights_type=IDKAPWeights,
    streams=(REFUSAL, RETAIN, RETAIN_REFUSAL),  # the forget answers themselves are never scored
    reference="Yuan et al. 2024, arXiv 2410.08109",
)
