"""Maximum entropy on forget + gradient descent on retain: Yuan et al. 2024, "A Closer Look at
Machine Unlearning for Large Language Models" (arXiv 2410.08109), section 4.1 (untargeted unlearning).

    L = a * mean_t KL(U || p_theta(. | x, y_<t))  +  c * NLL(retain)
    KL(U || p) = -log V - (1/V) sum_v log p(v)

The ME term is minimal (0) when the model's prediction at every forget answer position is uniform,
i.e. it behaves like a model that never saw the data instead of one steered to wrong answers; it is
bounded below by 0 by construction, so no cap is needed. Paper weights a = 0.1, c = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import (
    FORGET,
    RETAIN,
    LossOutput,
    Objective,
    ObjectiveInputs,
    kl_uniform_to_model,
    masked_mean,
    mean_nll,
    scalar,
)


@dataclass(frozen=True)
class MEGDWeights:
    forget: float = 0.1  # a
    retain: float = 1.0  # c


def me_gd_loss(inputs: ObjectiveInputs, w: MEGDWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]
    kl_u, mask = kl_uniform_to_model(forget.student, forget.labels)
    max_entropy = masked_mean(kl_u, mask)
    retain_nll = mean_nll(retain.student, retain.labels)
    total = w.forget * max_entropy + w.retain * retain_nll
    return LossOutput(total, {"kl_uniform_forget": scalar(max_entropy), "nll_retain": scalar(retain_nll)})


ME_GD = Objective(
    name="me_gd",
    loss=me_gd_loss,
    weights_type=MEGDWeights,
    streams=(FORGET, RETAIN),
    reference="Yuan et al. 2024, arXiv 2410.08109",
)
