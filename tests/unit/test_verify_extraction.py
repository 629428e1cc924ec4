"""Greedy extraction, answer ROUGE-L recall and the truth ratio on models with known behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.verify_fakes import half_prob_other, tokenizer_and_model
from workers.engine.decoding import greedy_generate
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.extraction import generations, rouge_l_recall, truth_ratios
from workers.engine.verify.scoring import EvalItem, encode_pair, text_ids


def test_rouge_l_recall_identical_is_one_disjoint_is_zero_partial_is_lcs_over_reference():
    assert rouge_l_recall("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l_recall("the cat sat", "dogs run fast") == 0.0
    assert rouge_l_recall("the cat sat on the mat", "the cat") == pytest.approx(2 / 6)
    assert rouge_l_recall("", "anything") == 0.0


def test_memorised_text_is_extracted_verbatim():
    tok, model = tokenizer_and_model()
    text = "abcd efgh"
    model.memorise(text_ids(tok, text))
    (gen,) = generations(model, tok, [EvalItem(text=text)])
    assert gen.reference == " efgh"  # BOS + the first 4 of 9 text tokens are the prompt
    assert gen.text == " efgh" and gen.rouge_l_recall == 1.0


def test_unmemorised_text_is_not_extracted():
    tok, model = tokenizer_and_model()
    (gen,) = generations(model, tok, [EvalItem(text="abcd efgh")])
    assert gen.rouge_l_recall == 0.0


def test_memorised_answer_is_generated_and_stops_at_eos():
    tok, model = tokenizer_and_model()
    enc = encode_pair(tok, "Capital of France?", "Paris")
    model.memorise(enc.ids[enc.start - 1 :] + [tok.eos_token_id])
    (gen,) = generations(
        model, tok, [EvalItem(prompt="Capital of France?", answer="Paris")], max_new_tokens=20
    )
    assert gen.text == "Paris" and gen.rouge_l_recall == 1.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_left_padded_greedy_matches_hf_generate(family):
    tok, model = tiny_tokenizer(), tiny_model(family)
    with torch.no_grad():  # sharpen the random model so its greedy path is not a constant token
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    prompts = [tok("Hello world, this is")["input_ids"], tok("Hi")["input_ids"]]
    ours = greedy_generate(model, prompts, 10, pad_id=tok.pad_token_id, stops={tok.eos_token_id})
    for prompt, tokens in zip(prompts, ours):
        reference = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        expected = [t for t in reference[0, len(prompt) :].tolist()]
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert tokens == expected


def test_truth_ratio_is_one_when_the_model_cannot_tell_answers_apart():
    tok, model = tokenizer_and_model()
    item = EvalItem(prompt="Q?", answer="Paris", perturbed_answers=("Lyon", "Nice"))
    assert truth_ratios(model, tok, [item]) == [pytest.approx(1.0, rel=1e-5)]


def test_truth_ratio_has_its_closed_form_value():
    tok, model = tokenizer_and_model()
    v = len(tok)
    enc = encode_pair(tok, "Q?", "Paris")
    model.memorise(enc.ids[enc.start - 1 :])  # true answer: every token p = 1/2
    item = EvalItem(prompt="Q?", answer="Paris", perturbed_answers=("Lyon",))
    # "Lyon": first token from the memorised header row (p = 0.5/(V-1)); L, y, o rows are uniform (1/V)
    perturbed_norm = (half_prob_other(v) * v**-3) ** (1 / 4)
    assert truth_ratios(model, tok, [item]) == [pytest.approx(perturbed_norm / 0.5, rel=1e-5)]


def test_truth_ratio_prefers_the_paraphrase_and_skips_items_without_perturbations():
    tok, model = tokenizer_and_model()
    enc = encode_pair(tok, "Q?", "Paris")
    model.memorise(enc.ids[enc.start - 1 :])
    items = [
        EvalItem(prompt="Q?", answer="zzz", paraphrased_answer="Paris", perturbed_answers=("Lyon",)),
        EvalItem(prompt="Q?", answer="Paris"),
        EvalItem(text="no pair"),
    ]
    (ratio,) = truth_ratios(model, tok, items)
    assert ratio < 0.01 and math.isfinite(ratio)
