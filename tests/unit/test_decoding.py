"""The shared KV-cached decoder: stop tokens, padding that changes nothing, rows that join and leave a running
batch decode as they would alone."""

from __future__ import annotations

import pytest
import torch

from workers.engine.decoding import DecodeBatch, greedy_generate, stop_token_ids
from workers.engine.testing import sharp_tiny_model, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def sharp_model():
    return sharp_tiny_model()


def test_stop_tokens_are_the_tokenizer_eos_and_the_generation_config_eos():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    model.generation_config.eos_token_id = [7, 9]
    assert stop_token_ids(model, tok) == {tok.eos_token_id, 7, 9}


def test_a_left_padded_row_decodes_as_it_would_alone(sharp_model):
    tok = tiny_tokenizer()
    prompts = [tok("Hello world, this is")["input_ids"], tok("Hi")["input_ids"]]
    together = greedy_generate(sharp_model, prompts, 8, pad_id=tok.pad_token_id)
    assert together == [greedy_generate(sharp_model, [p], 8, pad_id=tok.pad_token_id)[0] for p in prompts]


def alone(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of `prompt` decoded by itself (no stop tokens: every step counts)."""
    return greedy_generate(model, [prompt], steps)[0]


def test_a_row_that_joins_a_running_batch_decodes_as_it_would_alone(sharp_model):
    tok = tiny_tokenizer()
    first, late = tok("The capital of France is")["input_ids"], tok("Hi")["input_ids"]
    batch, produced = DecodeBatch(sharp_model, tok.pad_token_id), [[], []]
    with torch.inference_mode():
        logits = batch.add([first])
        for step in range(10):
            if step == 3:  # the second row joins after three steps of the first
                logits = torch.cat([logits, batch.add([late])])
            tokens = logits.argmax(-1)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                produced[row].append(token)
            logits = batch.step(tokens)
    assert produced[0] == alone(sharp_model, first, 10)
    assert produced[1] == alone(sharp_model, late, 7)


def test_rows_that_leave_free_their_columns_and_the_rest_decode_on(sharp_model):
    tok = tiny_tokenizer()
    long, short = tok("Hello world, this is a long prompt")["input_ids"], tok("Hi")["input_ids"]
    batch, kept = DecodeBatch(sharp_model, tok.pad_token_id), []
    with torch.inference_mode():
        logits = batch.add([long, short])
        tokens = logits.argmax(-1)
        batch.keep([1])  # the long row leaves: its padding-only columns go with it
        assert batch.ids.shape == (1, len(short)) and bool(batch.mask.all())
        logits = batch.step(tokens[[1]])
        kept.append(int(tokens[1]))
        for _ in range(5):
            token = logits.argmax(-1)
            kept.append(int(token[0]))
            logits = batch.step(token)
    assert kept == alone(sharp_model, short, 6)
