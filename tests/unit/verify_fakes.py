"""Hand-built language models with known next-token distributions, for exact metric tests.

BigramLM: logits at position t depend only on token t (a V x V table), so every probability is known in
closed form and padding or batch composition cannot change it. `memorise` sets, for each consecutive pair
(x, y) of a token sequence, p(y | x) = 1/2 (logit log(V - 1) against zeros elsewhere).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from workers.engine.testing import tiny_tokenizer


class BigramLM(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))  # uniform until memorised
        self.uniform = False

    def forward(self, input_ids, attention_mask=None, **_ignored):
        logits = self.table[input_ids]  # (B, T, V)
        if self.uniform:
            logits = torch.zeros_like(logits)
        return SimpleNamespace(logits=logits, past_key_values=None)

    @contextmanager
    def as_uniform(self):
        """A reference_ctx: inside, the model is the uniform distribution (the 'base')."""
        self.uniform = True
        try:
            yield
        finally:
            self.uniform = False

    def memorise(self, ids: list[int]) -> BigramLM:
        with torch.no_grad():
            for x, y in itertools.pairwise(ids):
                self.table[x].zero_()
                self.table[x, y] = math.log(self.table.shape[0] - 1)
        return self


def tokenizer_and_model():
    tok = tiny_tokenizer()
    return tok, BigramLM(len(tok))


def half_prob_other(vocab: int) -> float:
    """p of any non-memorised token in a memorised row: (1/2) / (V - 1)."""
    return 0.5 / (vocab - 1)
