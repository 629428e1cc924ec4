"""Verification metrics for unlearning (DESIGN.md section 6): before -> after on forget, retain, general
and held-out data, a thresholded verdict, and an optional relearning probe. Pure torch/transformers.

    before = evaluate(model, tok, forget, retain, general=None, holdout=holdout)
    ... unlearn ...
    after = evaluate(model, tok, forget, retain, None, holdout, reference_ctx=attached.disabled)
    verdict = judge(before, after, operator_thresholds.bounded(request_overrides))

Metrics are evidence, not proof of erasure.
"""

from .mia import auc, min_k_plus_plus_score, min_k_score, privleak
from .relearn import relearn_probe
from .scoring import EvalItem, score_items, to_eval_items
from .suite import EvalConfig, evaluate, general_set, set_metrics
from .verdict import BOUNDS, Thresholds, Verdict, bounded, judge

__all__ = [
    "BOUNDS",
    "EvalConfig",
    "EvalItem",
    "Thresholds",
    "Verdict",
    "auc",
    "bounded",
    "evaluate",
    "general_set",
    "judge",
    "min_k_plus_plus_score",
    "min_k_score",
    "privleak",
    "relearn_probe",
    "score_items",
    "set_metrics",
    "to_eval_items",
]
