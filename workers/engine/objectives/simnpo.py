"""SimNPO: Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning" (arXiv 2410.07163), eq. 4, with the retain term as in NPO-RT.

    L_SimNPO = -(2/beta) E_forget[ log sigmoid( -(beta/|y|) log pi_theta(y|x) - gamma ) ]
             = -(2/beta) E_forget[ log sigmoid( beta * NLL_tok,theta(y|x) - gamma ) ]
    L = a * L_SimNPO + c * NLL(retain)

NPO without the reference model: the per-token (length-normalised) NLL replaces the log ratio to pi_ref, so
long and short forget answers get the same push and no teacher pass is needed on the forget batch. The
gradient fades as the answer's NLL grows past gamma/beta. Paper (TOFU): beta = 2.5, gamma = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import FORGET, RETAIN, LossOutput, Objective, ObjectiveInputs, mean_nll, scalar, token_nll


@dataclass(frozen=True)
class SimNPOWeights:
    forget: float = 1.0  # a
    retain: float = 1.0  # c
    beta: float = 2.5
    gamma: float = 0.0


def simnpo_loss(inputs: ObjectiveInputs, w: SimNPOWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]
    nll, scored = token_nll(forget.student, forget.labels)  # (B, T-1) each
    per_token = nll.sum(dim=-1) / scored.sum(dim=-1).clamp(min=1)  # (B,): NLL_tok,theta(y|x)
    simnpo = -F.logsigmoid(w.beta * per_token - w.gamma).mean() * 2.0 / w.beta
    retain_nll = mean_nll(retain.student, retain.labels)
    total = w.forget * simnpo + w.retain * retain_nll
    return LossOutput(
        total,
        {"simnpo": scalar(simnpo), "nll_forget": scalar(per_token.mean()), "nll_retain": scalar(retain_nll)},
    )


SIMNPO = Objective(
    name="simnpo",
    loss=simnpo_loss,
    weights_type=SimNPOWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(),
    reference="Fan et al. 2024, arXiv 2410.07163",
)
