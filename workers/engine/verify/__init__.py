"""Verification metrics for unlearning (DESIGN.md section 6): before -> after on forget, retain, general
and held-out data, a thresholded verdict, and an optional relearning probe. Pure torch/transformers.

    before = evaluate(model, tok, forget, retain, general=None, holdout=holdout)
    ... unlearn ...
    after = evaluate(model, tok, forget, retain, None, holdout, reference_ctx=attached.disabled)
    verdict = judge(before, after, operator_thresholds.bounded(request_overrides))

Metrics are evidence, not proof of erasure.
"""


from importlib import import_module
from typing import Any

# name -> submodule. Loaded on first use (PEP 562), so that importing the torch-free `verify.verdict`
# (the API's settings and schemas validate thresholds with it) does not pull in torch and scipy.
_EXPORTS = {
    "auc": "mia", "min_k_plus_plus_score": "mia", "min_k_score": "mia", "privleak": "mia",
    "relearn_probe": "relearn", "quantized_forget": "quantization",
    "EvalItem": "scoring", "score_items": "scoring", "to_eval_items": "scoring",
    "EvalConfig": "suite", "evaluate": "suite", "evaluate_forget": "suite", "general_set": "suite",
    "set_metrics": "suite",
    "BOUNDS": "verdict", "Thresholds": "verdict", "Verdict": "verdict", "bounded": "verdict", "judge": "verdict",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "BOUNDS",
    "EvalConfig",
    "EvalItem",
    "Thresholds",
    "Verdict",
    "auc",
    "bounded",
    "evaluate",
    "evaluate_forget",
    "general_set",
    "judge",
    "min_k_plus_plus_score",
    "min_k_score",
    "privleak",
    "quantized_forget",
    "relearn_probe",
    "score_items",
    "set_metrics",
    "to_eval_items",
]
