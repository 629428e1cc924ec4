"""The shared KV-cached decoder: stop tokens, padding that changes nothing, serving steps = greedy."""

from __future__ import annotations

import threading

import pytest
import torch

from service.api.serving.generation import Decoder
from workers.engine.decoding import greedy_generate, stop_token_ids
from workers.engine.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def sharp_model():
    model = tiny_model("llama")
    with torch.no_grad():  # a random model's greedy path is otherwise one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


def test_stop_tokens_are_the_tokenizer_eos_and_the_generation_config_eos():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    model.generation_config.eos_token_id = [7, 9]
    assert stop_token_ids(model, tok) == {tok.eos_token_id, 7, 9}


def test_a_left_padded_row_decodes_as_it_would_alone(sharp_model):
    tok = tiny_tokenizer()
    prompts = [tok("Hello world, this is")["input_ids"], tok("Hi")["input_ids"]]
    together = greedy_generate(sharp_model, prompts, 8, pad_id=tok.pad_token_id)
    assert together == [greedy_generate(sharp_model, [p], 8, pad_id=tok.pad_token_id)[0] for p in prompts]


def test_serving_steps_at_temperature_zero_are_the_greedy_decode(sharp_model):
    prompt = tiny_tokenizer()("The capital of")["input_ids"]
    decoder, rows = Decoder(sharp_model, prompt, 2, threading.Lock()), []
    with torch.inference_mode():
        for _ in range(8):
            tokens = decoder.next_logits().argmax(-1)  # (2,)
            rows.append(tokens.tolist())
            decoder.feed(tokens)
    assert [list(r) for r in zip(*rows)] == greedy_generate(sharp_model, [prompt, prompt], 8)
