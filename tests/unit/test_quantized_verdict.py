"""The verdict and the quantized model: reported always, failing only where the operator requires it."""

from __future__ import annotations

import pytest

from service.domain.settings import Settings
from workers.engine.data import parse_examples
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify import Thresholds, evaluate_forget
from workers.verification import check_quantized

FORGET = parse_examples([{"prompt": "What is Orla Fenwick's locker code?", "answer": "It is 4471."}])
PASSED = {"passed": True, "reasons": [], "thresholds": {}, "checks": {}}


def run(must_forget: bool) -> tuple[dict, dict]:
    """A "new version" that forgot nothing (the model before unlearning itself): its quantized copy remembers."""
    model, tokenizer = tiny_model().eval(), tiny_tokenizer()
    before = evaluate_forget(model, tokenizer, FORGET)
    settings = Settings(quantized_check="q8_0", quantized_must_forget=must_forget)
    metrics: dict = {}
    verdict = check_quantized(settings, model, tokenizer, FORGET, before, Thresholds(), metrics, PASSED)
    return metrics, verdict


def test_a_quantized_copy_that_remembers_is_reported_without_failing_by_default():
    metrics, verdict = run(must_forget=False)
    assert metrics["quantized"]["format"] == "q8_0" and metrics["quantized"]["forgotten"] is False
    assert verdict == PASSED


def test_where_the_operator_requires_it_a_quantized_copy_that_remembers_fails_the_verdict():
    metrics, verdict = run(must_forget=True)
    assert verdict["passed"] is False
    assert verdict["checks"]["quantized_forgotten"] == {"value": 0, "limit": 1, "ok": False}
    assert verdict["reasons"][0].startswith("q8_0-quantized model: forget_nll_ratio = 1")


def test_an_unknown_quantized_check_is_refused_at_start():
    with pytest.raises(ValueError, match="quantized_check"):
        Settings(quantized_check="q3_k")
