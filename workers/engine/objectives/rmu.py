"""Representation misdirection (RMU): Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious
Use With Unlearning" (arXiv 2403.03218), section 5, with the steering coefficient scaled to the layer's own
activation norm as in adaptive RMU (Dang et al. 2025, "On Effects of Steering Latent Representation for Large
Language Model Unlearning", arXiv 2408.06223).

Paper:  L = E_forget[ ||h_theta,l(x) - c u||^2 ] + alpha E_retain[ ||h_theta,l(x) - h_ref,l(x)||^2 ]
        h_l the output of block l, u a fixed random unit vector, c a steering coefficient, h_ref the frozen model.

Here:   L = f * <||h_theta,l,t - c u||^2 / c^2>_forget + r * <||h_theta,l,t - h_ref,l,t||^2 / ||h_ref,l,t||^2>_retain
        c = beta * <||h_ref,l,t||>_forget   (adaptive RMU's scaling, so one beta fits any model)

The paper's plain MSEs need alpha ~ 1e3 tuned per model because activation norms differ by orders of magnitude
between models and layers; dividing by c^2 and by each retain token's own norm makes both terms relative
errors of order 1, so the weights carry over. The forget term scores the positions that predict an answer
token (the chat template before the answer is shared with every retain item, so pushing it away would fight
the retain term), the retain term every real position the trainer keeps (from the first that predicts an
answer token: for chat pairs the answer, for free text all of it). Only the layers up to block l get a
gradient; the unlearning layer's later blocks stay at their zero init. l = round(depth * number of blocks), at
least 1: the paper steers at layer 7 of 32 (depth ~0.22). u is drawn from U[0, 1)^D as in the paper, by a
generator seeded with `direction_seed`, so a request's direction does not depend on the trainer's random
state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .base import FORGET, RETAIN, LossOutput, Objective, ObjectiveInputs, masked_mean, predicting_positions, scalar


@dataclass(frozen=True)
class RMUWeights:
    forget: float = 1.0  # f
    retain: float = 10.0  # r: our value (the paper's alpha is for its unnormalised MSE)
    beta: float = 5.0  # c = beta * mean forget activation norm (adaptive RMU's beta)
    depth: float = 0.25  # block l = round(depth * blocks)
    direction_seed: float = 0.0


@lru_cache(maxsize=8)
def _direction(width: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(width, generator=generator)
    return u / u.norm()


def steering_direction(width: int, seed: int, device: torch.device) -> Tensor:
    """The fixed random unit vector u (D,)."""
    return _direction(width, seed).to(device)


def steered_block(hidden: tuple[Tensor, ...], depth: float) -> int:
    """Index into HF hidden_states (0 = embeddings, i = output of block i - 1) of block l's output."""
    blocks = len(hidden) - 1
    return min(max(round(depth * blocks), 1), blocks)


def rmu_loss(inputs: ObjectiveInputs, w: RMUWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]
    index = steered_block(forget.hidden, w.depth)
    h_forget = forget.hidden[index].float()  # (B, T, D)
    h_forget_ref = forget.teacher_hidden[index].float()  # (B, T, D)
    at = predicting_positions(forget.labels)  # (B, T)
    coefficient = w.beta * masked_mean(h_forget_ref.norm(dim=-1), at)  # c, scalar
    target = coefficient * steering_direction(h_forget.shape[-1], int(w.direction_seed), h_forget.device)  # (D,)
    misdirect = masked_mean((h_forget - target).pow(2).sum(-1), at) / coefficient.pow(2).clamp_min(1e-12)

    h_retain = retain.hidden[index].float()
    h_retain_ref = retain.teacher_hidden[index].float()
    drift = (h_retain - h_retain_ref).pow(2).sum(-1) / h_retain_ref.pow(2).sum(-1).clamp_min(1e-12)  # (B, T)
    keep = masked_mean(drift, retain.attention_mask.bool())

    total = w.forget * misdirect + w.retain * keep
    cosine = masked_mean(torch.nn.functional.cosine_similarity(h_forget, target.expand_as(h_forget), dim=-1), at)
    return LossOutput(total, {"misdirect": scalar(misdirect), "retain_drift": scalar(keep),
                              "cos_to_direction": scalar(cosine), "block": float(index - 1)})


RMU = Objective(
    name="rmu",
    loss=rmu_loss,
    weights_type=RMUWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(FORGET, RETAIN),
    reference="Li et al. 2024, arXiv 2403.03218; adaptive scaling: Dang et al. 2025, arXiv 2408.06223",
    reads_hidden=True,
)
