"""Per-item NLL / probability on models whose next-token distributions are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.verify_fakes import tokenizer_and_model
from workers.engine.data import Example
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.scoring import (
    EvalItem,
    encode_pair,
    encode_text,
    log_prob_moments,
    nll_summary,
    score_items,
    text_ids,
    to_eval_item,
)


def test_uniform_model_has_nll_log_v_probability_1_over_v_and_perplexity_v():
    tok, model = tokenizer_and_model()
    v = len(tok)
    scores = score_items(model, tok, [EvalItem(text="hello world"), EvalItem(prompt="Q?", answer="A.")])
    summary = nll_summary(scores)
    assert summary["nll"] == pytest.approx(math.log(v), rel=1e-6)
    assert summary["prob"] == pytest.approx(1 / v, rel=1e-5)
    assert summary["ppl"] == pytest.approx(v, rel=1e-4)


def test_memorised_text_has_nll_log_2_per_token():
    tok, model = tokenizer_and_model()
    text = "abcdefg"
    model.memorise(text_ids(tok, text))
    (scores,) = score_items(model, tok, [EvalItem(text=text)])
    assert scores.logprobs.numel() == len(text)  # every character, the first one too (after BOS)
    assert scores.nll == pytest.approx(math.log(2), rel=1e-6)


def test_pair_scores_only_the_answer_tokens():
    tok = tiny_tokenizer()
    enc = encode_pair(tok, "What is the capital of France?", "Paris")
    assert tok.decode(enc.ids[enc.start :]) == "Paris"
    assert tok.decode(enc.ids[: enc.start]).endswith("assistant\n")  # chat template: user turn + header
    _, model = tokenizer_and_model()
    (scores,) = score_items(model, tok, [EvalItem(prompt="What is the capital of France?", answer="Paris")])
    assert scores.logprobs.numel() == len("Paris")


def test_pair_without_chat_template_is_prompt_space_answer():
    tok = tiny_tokenizer()
    tok.chat_template = None
    enc = encode_pair(tok, "Capital of France?", "Paris")
    assert tok.decode(enc.ids, skip_special_tokens=True) == "Capital of France? Paris"
    assert tok.decode(enc.ids[enc.start :]) == " Paris"


def test_answer_probability_given_the_prompt_is_exact():
    tok, model = tokenizer_and_model()
    enc = encode_pair(tok, "Q?", "xyz")
    model.memorise(enc.ids[enc.start - 1 :])  # header's last token -> x -> y -> z
    (scores,) = score_items(model, tok, [EvalItem(prompt="Q?", answer="xyz")])
    assert math.exp(-scores.nll) == pytest.approx(0.5, rel=1e-6)


def test_scores_do_not_depend_on_batch_padding():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    items = [EvalItem(text="short"), EvalItem(text="a much longer sentence that forces padding on the other")]
    alone = score_items(model, tok, items[:1], batch_size=1)[0].logprobs
    batched = score_items(model, tok, items, batch_size=2)[0].logprobs
    assert torch.allclose(alone, batched, atol=1e-5)


def test_truncation_keeps_at_most_max_length_tokens():
    tok = tiny_tokenizer()
    assert len(encode_text(tok, "x" * 500, max_length=64).ids) == 64
    enc = encode_pair(tok, "q" * 500, "answer", max_length=64)
    assert len(enc.ids) <= 64 and tok.decode(enc.ids[enc.start :]) == "answer"


def test_moments_of_uniform_and_of_a_known_distribution():
    uniform = torch.log_softmax(torch.zeros(1, 4), -1)
    mu, sigma = log_prob_moments(uniform)
    assert mu.item() == pytest.approx(-math.log(4)) and sigma.item() == pytest.approx(0, abs=1e-3)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    mu, sigma = log_prob_moments(p.log())
    expected_mu = 0.5 * math.log(0.5) + 0.5 * math.log(0.25)
    expected_var = 0.5 * math.log(0.5) ** 2 + 0.5 * math.log(0.25) ** 2 - expected_mu**2
    assert mu.item() == pytest.approx(expected_mu) and sigma.item() == pytest.approx(math.sqrt(expected_var))


def test_items_come_from_examples_and_tofu_rows():
    assert to_eval_item(Example(text="t")) == EvalItem(text="t")
    row = {"question": "Q", "answer": "A", "paraphrased_answer": "A'", "perturbed_answer": ["B", "C"]}
    assert to_eval_item(row) == EvalItem(
        prompt="Q", answer="A", paraphrased_answer="A'", perturbed_answers=("B", "C")
    )
    with pytest.raises(ValueError):
        to_eval_item({"prompt": "no answer"})
