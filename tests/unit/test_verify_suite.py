"""The built-in general set and evaluate() end to end on a tiny random model."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from tests.unit.verify_fakes import tokenizer_and_model
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.scoring import text_ids
from workers.engine.verify.suite import EvalConfig, evaluate, general_set

FORGET = [
    {"question": "Who wrote The Glass Orchard?", "answer": "Mira Tallis wrote it in 1987."},
    {"text": "Basil Okonkwo lives at 14 Larch Road and his phone number is 555-0199."},
]
HOLDOUT = [
    {"question": "Who wrote The Paper Harbour?", "answer": "Ivo Brandt wrote it in 1992."},
    {"text": "Clara Mendes lives at 9 Birch Lane and her phone number is 555-0142."},
]
FAST = EvalConfig(max_new_tokens=6, batch_size=4)


def _numbers(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _numbers(value)
        else:
            yield value


def test_general_set_is_fixed_mixed_and_capped():
    first, second = general_set(6, 3), general_set(6, 3)
    assert first == second and len(first) == 9
    pairs = [i for i in first if i.is_pair]
    assert len(pairs) == 6 and all(i.perturbed_answers for i in pairs)
    assert sum(not i.is_pair for i in first) == 3
    assert len(general_set()) == 24


@pytest.fixture(scope="module")
def tiny_result():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    result = evaluate(
        model,
        tok,
        FORGET,
        FORGET[:1],
        general_set(4, 2),
        HOLDOUT,
        reference_ctx=contextlib.nullcontext,
        cfg=FAST,
    )
    return result, model, before


def test_evaluate_runs_end_to_end_and_returns_finite_json_numbers(tiny_result):
    result, _, _ = tiny_result
    assert set(result) == {"forget", "retain", "general", "mia"}
    numbers = list(_numbers(result))
    assert numbers and all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
    json.dumps(result, allow_nan=False)
    for key in ("nll", "prob", "ppl", "rougeL", "extraction_rougeL", "answer_rougeL", "token_entropy"):
        assert key in result["forget"]
    assert {"truth_ratio", "kl_to_base"} <= set(result["general"])
    assert {"auc_loss", "auc_min_k", "auc_min_k_pp", "privleak_min_k_pp"} <= set(result["mia"])
    assert (result["forget"]["n"], result["retain"]["n"], result["general"]["n"]) == (2, 1, 6)


def test_a_reference_equal_to_the_model_gives_zero_kl_and_zero_privleak(tiny_result):
    result, _, _ = tiny_result
    assert result["general"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert result["mia"]["privleak_min_k"] == 0.0 and result["mia"]["privleak_loss"] == 0.0


def test_evaluate_leaves_the_model_untouched_and_in_its_mode(tiny_result):
    _, model, before = tiny_result
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sets_are_capped_and_optional_sets_may_be_missing():
    tok, model = tokenizer_and_model()
    result = evaluate(model, tok, FORGET * 5, cfg=EvalConfig(max_forget=3, max_general=2, generate=False))
    assert result["forget"]["n"] == 3 and result["general"]["n"] == 2
    assert result["retain"] == {"n": 0} and result["mia"] == {"n_forget": 3, "n_holdout": 0}
    assert "rougeL" not in result["forget"]  # generation off: likelihood metrics only
    assert "neighbours" not in result  # no probe set given: no section, so no neighbour check


def test_a_neighbour_probe_set_is_scored_with_answer_recall_and_nll():
    tok, model = tokenizer_and_model()
    probe = [{"prompt": "Who was Isaac Newton?", "answer": "A physicist."}] * 3
    result = evaluate(model, tok, FORGET, general=[], neighbours=probe, cfg=EvalConfig(max_new_tokens=4))
    section = result["neighbours"]
    assert section["n"] == 3 and math.isfinite(section["nll"]) and 0.0 <= section["rougeL"] <= 1.0


def test_forgetting_shows_as_higher_forget_nll_and_lower_extraction():
    tok, model = tokenizer_and_model()
    text = "abcdefg hijklmn"  # no repeated token, so a bigram model can memorise it exactly
    model.memorise(text_ids(tok, text))
    cfg = EvalConfig(max_new_tokens=40)
    remembered = evaluate(model, tok, [{"text": text}], general=[], cfg=cfg)
    with torch.no_grad():
        model.table.zero_()  # "unlearn": back to uniform
    forgotten = evaluate(model, tok, [{"text": text}], general=[], cfg=cfg)
    assert (
        remembered["forget"]["extraction_rougeL"] == 1.0 and forgotten["forget"]["extraction_rougeL"] == 0.0
    )
    assert forgotten["forget"]["nll"] > 2 * remembered["forget"]["nll"]
