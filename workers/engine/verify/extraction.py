"""Verbatim extraction, answer recall and TOFU's truth ratio: does the model still *produce* the data?

- Extraction (Carlini et al. 2021 style): greedy-continue the first half of a text item's tokens and
  take ROUGE-L recall of the continuation against the true second half.
- Answer recall: greedy answer to the prompt, ROUGE-L recall against the true answer (TOFU).
- Truth ratio (Maini et al. 2024, TOFU):
      R_truth = mean_j P(a_pert_j | q)^(1/|a_pert_j|) / P(a_para | q)^(1/|a_para|)
  with the paraphrased answer when given, else the answer itself. R near 0: the model strongly prefers
  the true answer; R near 1: it cannot tell truth from perturbations. (TOFU's code averages log-probs
  over the perturbed answers, i.e. a geometric mean; the paper's formula, used here, is arithmetic.)
ROUGE-L via `rouge-score` with the Porter stemmer, as in TOFU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rouge_score import rouge_scorer
from torch import nn

from ..decoding import greedy_generate, stop_token_ids
from .scoring import (
    Encoded,
    EvalItem,
    encode_pair,
    pad_token_id,
    prefix_token_id,
    prompt_ids,
    safe_exp,
    score_encodings,
    text_ids,
)

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(reference: str, prediction: str) -> float:
    """LCS(reference, prediction) / |reference| over rouge-score's word tokens (0 for an empty reference)."""
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


@dataclass(frozen=True)
class Generation:
    """One greedy generation and its ROUGE-L recall against the reference it should (not) reproduce."""

    tokens: list[int]
    text: str
    reference: str
    rouge_l_recall: float


def split_text(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], list[int]]:
    """(BOS + first half of the text tokens, second half): the extraction prompt and its truth."""
    ids = text_ids(tokenizer, text)[:max_length]
    lead = 1 if prefix_token_id(tokenizer) is not None else 0  # text_ids put the BOS there
    half = lead + (len(ids) - lead) // 2
    return ids[:half], ids[half:]


def generations(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[EvalItem],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 256,
) -> list[Generation]:
    """Greedy generation per item: text items continue their first half (as many tokens as the true
    second half, capped at max_new_tokens); pair items answer their prompt."""
    prompts, references, budgets = [], [], []
    for item in items:
        if item.is_pair:
            prompts.append(prompt_ids(tokenizer, item.prompt or "")[-max_length:])
            references.append(item.answer or "")
            budgets.append(max_new_tokens)
        else:
            head, truth = split_text(tokenizer, item.text or "", max_length)
            prompts.append(head)
            references.append(tokenizer.decode(truth, skip_special_tokens=True))
            budgets.append(max(1, min(len(truth), max_new_tokens)))
    stops, pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    outputs = greedy_generate(model, prompts, max(budgets, default=1), pad_id, stops, batch_size)
    result = []
    for tokens, reference, budget in zip(outputs, references, budgets):
        tokens = tokens[:budget]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        result.append(Generation(tokens, text, reference, rouge_l_recall(reference, text)))
    return result


def truth_ratios(
    model: nn.Module, tokenizer: Any, items: Sequence[EvalItem], batch_size: int = 8, max_length: int = 256
) -> list[float]:
    """R_truth per pair item that has perturbed answers (others are skipped), in item order."""
    encodings: list[Encoded] = []
    spans: list[tuple[int, int]] = []  # (index of the true answer's encoding, number of perturbed)
    for item in items:
        if not item.is_pair or not item.perturbed_answers:
            continue
        true_answer = item.paraphrased_answer or item.answer or ""
        spans.append((len(encodings), len(item.perturbed_answers)))
        encodings.append(encode_pair(tokenizer, item.prompt or "", true_answer, max_length))
        encodings.extend(
            encode_pair(tokenizer, item.prompt or "", p, max_length) for p in item.perturbed_answers
        )
    scores = score_encodings(model, encodings, pad_token_id(tokenizer), batch_size)
    return [
        _truth_ratio(scores[first].nll, [s.nll for s in scores[first + 1 : first + 1 + count]])
        for first, count in spans
    ]


def _truth_ratio(true_nll: float, perturbed_nll: Sequence[float]) -> float:
    """mean_j exp(-nll_j) / exp(-nll_true), in log space so tiny probabilities do not underflow to 0/0."""
    log_mean = torch.logsumexp(-torch.tensor(perturbed_nll, dtype=torch.float64), 0) - math.log(
        len(perturbed_nll)
    )
    return safe_exp(float(log_mean) + true_nll)
