"""Who's Harry Potter (WHP): Eldan & Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs"
(arXiv 2310.02238), the reinforced-model part (the anchored-term dictionary, which needs an external
LLM to write, is left out), with the retain terms of the other objectives.

    1. reinforce:  the layer trained on the forget items with plain NLL (cfg.steps steps, the request's lr),
                   so the "reinforced model" knows them even better than the base
    2. relabel:    v_generic,t = v_base,t - alpha * ReLU(v_reinforced,t - v_base,t)    (logits over V)
                   y~_t+1 = argmax_v v_generic,t(v), teacher-forced over each forget item's own tokens
    3. unlearn:    the layer reset to its initial weights, then
                   L = g * NLL(y~ | forget item) + a * KL_r + c * NLL_r

A token whose logit the reinforcement raised is one the forget data made likelier (idiosyncratic to it:
"Ron", "Hermione" after "Harry went back to class where he saw"); lowering it by alpha times that rise lets
the base's generic alternatives win. Where the reinforcement raised nothing the label is the base's own
argmax. The trainer runs steps 1-2 (trainer.generic_forget) and passes this module's loss the FORGET stream
with the generic labels already in place, so the forget term is an ordinary NLL: bounded below, no ascent.

No specificity weight (the shared_token of eul/undial): that weight keeps a pushed-away forget term from
teaching the model to avoid generic wording; here nothing is pushed away, and the generic labels are by
construction the tokens the forget data did not make likelier.
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
    mean_kl,
    mean_nll,
    scalar,
    scored_mask,
    shift,
)


@dataclass(frozen=True)
class WHPWeights:
    forget: float = 1.0  # g: NLL toward the generic labels
    kl_retain: float = 4.0  # a (undial's value)
    lm_retain: float = 1.0  # c (undial's value)
    # Our value, not the paper's (it gives the formula with a free alpha): 5 makes a rise of one logit
    # outweigh a base margin of up to 5 logits. Overridable per request: TrainConfig.objective={"alpha": ...}.
    alpha: float = 5.0


@torch.no_grad()
def generic_logits(base_logits: Tensor, reinforced_logits: Tensor, alpha: float) -> Tensor:
    """v_base - alpha * ReLU(v_reinforced - v_base), same shape as the inputs, fp32."""
    base = base_logits.float()
    return base - alpha * (reinforced_logits.float() - base).clamp_min(0.0)


@torch.no_grad()
def generic_labels(base_logits: Tensor, reinforced_logits: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """New labels (B, T): every scored label replaced by the argmax of the generic logits at the position
    that predicts it (logits[:, t] predict labels[:, t+1]); IGNORE_INDEX stays, and so does labels[:, 0],
    which no position predicts."""
    base, targets = shift(base_logits, labels)  # (B, T-1, V), (B, T-1)
    reinforced, _ = shift(reinforced_logits, labels)
    generic = generic_logits(base, reinforced, alpha).argmax(dim=-1)  # (B, T-1)
    relabelled = labels.clone()
    relabelled[:, 1:] = torch.where(scored_mask(targets), generic.to(labels.device), targets)
    return relabelled


def whp_relabel(base_logits: Tensor, reinforced_logits: Tensor, labels: Tensor, w: WHPWeights) -> Tensor:
    """Objective.relabel: generic_labels with the request's alpha."""
    return generic_labels(base_logits, reinforced_logits, labels, w.alpha)


def whp_loss(inputs: ObjectiveInputs, w: WHPWeights) -> LossOutput:
    forget, retain = inputs[FORGET], inputs[RETAIN]  # forget.labels are the generic labels
    nll_generic = mean_nll(forget.student, forget.labels)
    kl_retain = mean_kl(retain.teacher, retain.student, retain.labels)
    lm_retain = mean_nll(retain.student, retain.labels)
    total = w.forget * nll_generic + w.kl_retain * kl_retain + w.lm_retain * lm_retain
    return LossOutput(total, {"nll_generic": scalar(nll_generic), "kl_retain": scalar(kl_retain),
                              "nll_retain": scalar(lm_retain)})


WHP = Objective(
    name="whp",
    loss=whp_loss,
    weights_type=WHPWeights,
    streams=(FORGET, RETAIN),
    teacher_streams=(RETAIN,),
    reference="Eldan & Russinovich 2023, arXiv 2310.02238",
    relabel=whp_relabel,
)
