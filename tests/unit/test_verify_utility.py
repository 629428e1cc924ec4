"""KL to the base model and token entropy of generations, with exact expected values."""

from __future__ import annotations

import contextlib
import math

import pytest

from tests.unit.verify_fakes import half_prob_other, tokenizer_and_model
from workers.engine.verify.scoring import EvalItem, encode_item, text_ids
from workers.engine.verify.utility import kl_to_reference, ngram_entropy, token_entropy


def test_kl_to_an_identical_model_is_zero():
    tok, model = tokenizer_and_model()
    model.memorise(text_ids(tok, "abcdef"))
    encodings = [
        encode_item(tok, EvalItem(text="abcdef")),
        encode_item(tok, EvalItem(prompt="Q", answer="A")),
    ]
    assert kl_to_reference(model, encodings, reference_model=model) == pytest.approx(0.0, abs=1e-7)
    assert kl_to_reference(model, encodings, reference_ctx=contextlib.nullcontext) == pytest.approx(
        0.0, abs=1e-7
    )


def test_kl_from_uniform_base_to_a_memorised_row_has_its_closed_form():
    tok, model = tokenizer_and_model()
    v = len(tok)
    ids = text_ids(tok, "a")  # one scored token, predicted from the BOS row
    model.memorise(ids)
    # KL(u || p) = sum_v (1/V)(log(1/V) - log p_v), p = 1/2 on one token, 0.5/(V-1) on the others
    expected = -math.log(v) - (math.log(0.5) + (v - 1) * math.log(half_prob_other(v))) / v
    got = kl_to_reference(model, [encode_item(tok, EvalItem(text="a"))], reference_ctx=model.as_uniform)
    assert got == pytest.approx(expected, rel=1e-5)
    assert not model.uniform  # the reference context was left


def test_kl_needs_a_reference():
    tok, model = tokenizer_and_model()
    with pytest.raises(ValueError):
        kl_to_reference(model, [encode_item(tok, EvalItem(text="a"))])


def test_token_entropy_repetitive_is_zero_and_all_distinct_is_one():
    assert ngram_entropy([5, 5, 5, 5]) == 0.0
    assert ngram_entropy([1, 2, 3, 4]) == pytest.approx(1.0)
    assert ngram_entropy([1, 1, 2, 2]) == pytest.approx(0.5)  # 1 bit of log2(4) = 2 bits
    assert ngram_entropy([1, 1, 2, 2], normalize=False) == pytest.approx(1.0)
    assert ngram_entropy([7]) == 0.0 and ngram_entropy([]) == 0.0


def test_token_entropy_over_bigrams_and_generations():
    assert ngram_entropy([1, 2, 1, 2, 1], n=2) == pytest.approx(0.5)  # (1,2),(2,1) twice each
    assert token_entropy([[5, 5, 5, 5], [1, 2, 3, 4]]) == pytest.approx(0.5)
    assert token_entropy([]) == 0.0
