"""General utility: perplexity, divergence from the base model, and degeneration of generations.

- Perplexity = exp(token-weighted mean NLL) on a fixed general set (scoring.nll_summary).
- KL to base, per scored token: KL(p_base || p_model) = sum_v p_base(v) (log p_base(v) - log p_model(v)),
  averaged over all scored tokens. The base comes from `reference_ctx()` (a context manager factory under
  which `model` itself computes the base, e.g. an attached layer's `disabled`) or a separate model.
- Token entropy (TE, Yuan et al. 2024, "A Closer Look at Machine Unlearning for LLMs"): per generation,
  the Shannon entropy (bits) of its n-gram frequency distribution divided by log2(number of n-grams);
  averaged over generations. 1 = no n-gram repeats; near 0 = "the the the ..." (degenerate output).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from .scoring import Encoded, batches, collate, model_device, next_token_log_probs

ReferenceCtx = Callable[[], AbstractContextManager[Any]]


@contextmanager
def reference_scope(
    model: nn.Module, reference_ctx: ReferenceCtx | None = None, reference_model: nn.Module | None = None
) -> Iterator[nn.Module]:
    """Yields the module that computes the base model: reference_model, or model inside reference_ctx()."""
    if reference_model is not None:
        yield reference_model
    elif reference_ctx is not None:
        with reference_ctx():
            yield model
    else:
        raise ValueError("a reference needs reference_ctx or reference_model")


@torch.no_grad()
def kl_to_reference(
    model: nn.Module,
    encodings: Sequence[Encoded],
    reference_ctx: ReferenceCtx | None = None,
    reference_model: nn.Module | None = None,
    pad_id: int = 0,
    batch_size: int = 8,
) -> float:
    """Mean per-token KL(base || model) in nats over the scored tokens of the encodings."""
    total, count = 0.0, 0
    for chunk in batches(encodings, batch_size):
        input_ids, attention, targets = collate(chunk, pad_id, model_device(model))
        model_lp = next_token_log_probs(model, input_ids, attention)  # (B, T-1, V)
        with reference_scope(model, reference_ctx, reference_model) as reference:
            base_lp = next_token_log_probs(
                reference, input_ids.to(model_device(reference)), attention.to(model_device(reference))
            ).to(model_lp.device)
        base_p = base_lp.exp()
        kl = torch.where(base_p > 0, base_p * (base_lp - model_lp), torch.zeros_like(base_p)).sum(
            -1
        )  # (B, T-1)
        mask = targets[:, : kl.shape[1]]
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / count if count else 0.0


def ngram_entropy(tokens: Sequence[Any], n: int = 1, normalize: bool = True) -> float:
    """Entropy in bits of the n-gram distribution of one sequence, / log2(#n-grams) if normalize."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) <= 1:
        return 0.0
    counts = Counter(grams)
    entropy = -sum(c / len(grams) * math.log2(c / len(grams)) for c in counts.values())
    return entropy / math.log2(len(grams)) if normalize else entropy


def token_entropy(generations: Sequence[Sequence[Any]], n: int = 1, normalize: bool = True) -> float:
    """Mean n-gram entropy over generations (token id lists); 0.0 for none."""
    if not generations:
        return 0.0
    return sum(ngram_entropy(g, n, normalize) for g in generations) / len(generations)
