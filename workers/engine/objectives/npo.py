"""Negative preference optimisation: Zhang et al. 2024, "Negative Preference Optimization: From
Catastrophic Collapse to Effective Unlearning" (arXiv 2404.05868), eq. 3, with the retain term of NPO-RT.

    L_NPO = (2/beta) E_forget[ log(1 + (pi_theta(y|x) / pi_ref(y|x))^beta) ]
          = -(2/beta) E_forget[ log sigmoid( beta * (NLL_seq,theta(y|x) - NLL_seq,ref(y|x)) ) ]
    L = a * L_NPO + c * NLL(retain)

pi_ref is the frozen base (the teacher pass); y|x log-probabilities are summed over the answer tokens.
The loss is bounded below by 0 and its gradient vanishes as pi_theta/pi_ref -> 0, which is what keeps
NPO from the collapse of plain gradient ascent. Paper: beta = 0.1; c = 0 gives plain NPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .base import FORGET, RETAIN, LossOutput, Objective, ObjectiveInputs, mean_nll, scalar, sequence_nll


@dataclass(frozen=True)
class NPOWeights:
    forget: float = 1.0  # a
    retain: float = 1.0  # c
    beta: float = 0.1


def npo_term(nll_theta: Tensor, nll_ref: Tensor, beta: float) -> Tensor:
    """-(2/beta) mean log sigmoid(beta * (NLL_theta - NLL_ref)) over per-sequence NLLs (B,)."""
    return -F.logsigmoid(beta * (nll_theta - nll_ref)).mean() * 2.0 / beta


def npo_loss(inputs: ObjectiveInputs, w: NPOWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]
    nll_theta = sequence_nll(forget.student, forget.labels)
    nll_ref = sequence_nll(forget.teacher, forget.labels)
    npo = npo_term(nll_theta, nll_ref.detach(), w.beta)
    retain_nll = mean_nll(retain.student, retain.labels)
    total = w.forget * npo + w.retain * retain_nll
    return LossOutput(
        total,
        {
            "npo": scalar(npo),
            "log_ratio_forget": scalar((nll_ref - nll_theta).mean()),
            "nll_forget": scalar(mean_nll(forget.student, forget.labels)),
            "nll_retain": scalar(retain_nll),
        },
    )


NPO = Objective(
    name="npo",
    loss=npo_loss,
    weights_type=NPOWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(FORGET,),
    reference="Zhang et al. 2024, arXiv 2404.05868",
)
