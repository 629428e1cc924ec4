"""Unlearning objectives, one module each (the formula and its paper in the module docstring).

    objective = get_objective(cfg.method)
    weights = objective.weights(cfg.objective)         # defaults + per-request overrides
    out = objective(ObjectiveInputs(streams), weights)  # out.total to backprop, out.terms to report

`objective.streams` says which batches the trainer must build and `objective.teacher_streams` which of
them also need the frozen base model's logits; `objective.relabel`, when set, that the trainer
replaces the forget labels first (whp's generic labels); `objective.reads_hidden`, that the
streams carry every block's output as well (rmu).
"""

from __future__ import annotations

from ..config import METHODS
from .base import (
    FORGET,
    IGNORE_INDEX,
    MISMATCH,
    REFUSAL,
    RETAIN,
    RETAIN_REFUSAL,
    LossOutput,
    Objective,
    ObjectiveInputs,
    Stream,
)
from .eul import EUL, EULWeights
from .ga_kl import GA_KL, GAKLWeights
from .idk_ap import IDK_AP, IDKAPWeights
from .me_gd import ME_GD, MEGDWeights
from .npo import NPO, NPOWeights
from .rmu import RMU, RMUWeights
from .simnpo import SIMNPO, SimNPOWeights
from .undial import UNDIAL, UNDIALWeights
from .whp import WHP, WHPWeights

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (EUL, GA_KL, ME_GD, IDK_AP, NPO, UNDIAL, SIMNPO, WHP, RMU)}
assert tuple(OBJECTIVES) == METHODS, "config.METHODS and the objective registry must list the same methods"


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown unlearning method {name!r}; choose one of {list(METHODS)}")
    return OBJECTIVES[name]


__all__ = [
    "FORGET", "IGNORE_INDEX", "METHODS", "MISMATCH", "OBJECTIVES", "REFUSAL", "RETAIN", "RETAIN_REFUSAL",
    "EULWeights", "GAKLWeights", "IDKAPWeights", "LossOutput", "MEGDWeights", "NPOWeights", "Objective",
    "ObjectiveInputs", "RMUWeights", "SimNPOWeights", "Stream", "UNDIALWeights", "WHPWeights", "get_objective",
]
