"""An earlier request re-checked on a later model: its own forget checks against what it was accepted on."""

from __future__ import annotations

from service.domain.probes import OpenedProbe
from workers.engine.data import parse_examples
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify import evaluate_forget
from workers.verification import reverify

ITEMS = [{"prompt": "What is Orla Fenwick's locker code?", "answer": "Orla Fenwick's locker code is 4471."},
         {"text": "Tessa Quill wears badge number 55821 at the Brindle Gym."}]
THRESHOLDS = {"min_forget_nll_ratio": 1.25, "max_forget_rougeL": 0.9}


def model_and_tokenizer():
    return tiny_model().eval(), tiny_tokenizer()


def probe(before: dict) -> OpenedProbe:
    return OpenedProbe("r-1", "acme", ITEMS, {"before": before, "thresholds": THRESHOLDS})


def test_a_model_that_is_still_the_one_before_unlearning_has_brought_the_request_back():
    model, tokenizer = model_and_tokenizer()
    before = evaluate_forget(model, tokenizer, parse_examples(ITEMS))
    result = reverify(model, tokenizer, probe(before))  # the same model: NLL ratio 1.0
    assert result["passed"] is False
    assert result["checks"]["forget_nll_ratio"]["value"] == 1.0
    assert "forget_nll_ratio" in result["reasons"][0] and result["tenant"] == "acme"


def test_a_model_whose_forget_nll_stays_well_above_the_baseline_still_forgets():
    model, tokenizer = model_and_tokenizer()
    now = evaluate_forget(model, tokenizer, parse_examples(ITEMS))
    result = reverify(model, tokenizer, probe({**now, "nll": now["nll"] / 2}))  # it was twice as likely before
    assert result["passed"] is True and result["reasons"] == []
    assert abs(result["checks"]["forget_nll_ratio"]["value"] - 2.0) < 1e-6
    assert set(result["checks"]) == {"forget_nll_ratio", "forget_rougeL"}  # only the request's own forget checks
    assert result["forget_after"]["nll"] == now["nll"]
