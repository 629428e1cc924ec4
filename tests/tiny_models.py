"""A tiny random model that has memorised some examples: unlearning then has something to remove, as with
a real model that knows its forget set (a near-uniform random model cannot get any 'more forgetful')."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workers.engine.batching import collate, encode, pad_id
from workers.engine.data import parse_examples
from workers.engine.testing import tiny_model, tiny_tokenizer


def memorising_tiny_model(out_dir: Path, rows: Sequence[dict[str, Any]], target_nll: float = 0.5,
                          max_steps: int = 300, seed: int = 0, hidden: int = 64) -> Path:
    """Fine-tune a tiny Llama on `rows` ({"text"} or {"prompt", "answer"}) laid out exactly as the engine
    trains and scores them (a pair through the chat template, only the answer scored), so the model knows
    them in the form the verification asks about.

    It stops at `target_nll` nats/token, about where SmolLM2 stands on facts it knows (0.6): a model
    trained to NLL ~0 has saturated softmaxes whose gradients vanish, which no real model has."""
    torch.manual_seed(seed)
    model, tokenizer = tiny_model("llama", seed=seed, hidden=hidden), tiny_tokenizer()
    model.train()
    batch = collate(encode(tokenizer, parse_examples(rows), max_length=256), pad_id(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(max_steps):
        optimizer.zero_grad()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        if loss.item() <= target_nll:
            break
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def logits(model, batch) -> torch.Tensor:
    """The model's logits on a tokenised batch, without autograd."""
    with torch.no_grad():
        return model(**batch).logits
