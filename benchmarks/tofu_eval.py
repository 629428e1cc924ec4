"""TOFU's metrics (Maini et al. 2024, sec. 3) on top of the engine's verification scoring.

Per evaluation set (rows of question, answer, optional paraphrased/perturbed answers):
- probability: forget/retain authors: mean P(a|q)^(1/|a|); real authors / world facts (multiple choice
  style): mean P(a|q)^(1/|a|) / (P(a|q)^(1/|a|) + sum_j P(a_j|q)^(1/|a_j|)) over the perturbed a_j.
- ROUGE-L recall of the greedy answer against the true answer.
- truth ratio R = mean_j P(a_pert_j|q)^(1/n) / P(a_para|q)^(1/n) (engine verify.extraction); the utility
  score is mean max(0, 1 - R) (TOFU: high = the model prefers the truth).
Model utility = harmonic mean of those 9 numbers over retain, real authors and world facts.
Forget quality = p-value of the two-sample KS test (scipy.stats.ks_2samp) between the truth ratios of the
forget set under the evaluated model and under the retain model: high = indistinguishable from a model
never trained on the forget authors. (KS is invariant to the monotone map R -> 1/R, so TOFU's code and
paper conventions give the same p-value.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import ks_2samp

from workers.engine.verify.extraction import generations, truth_ratios
from workers.engine.verify.scoring import EvalItem, encode_pair, pad_token_id, score_encodings, to_eval_item

Row = dict[str, Any]
UTILITY_SETS = ("retain", "real_authors", "world_facts")
RELATIVE_PROB_SETS = ("real_authors", "world_facts")


@dataclass
class SetScores:
    prob: float
    rouge_l: float
    truth: float  # mean max(0, 1 - R)
    ratios: list[float] = field(default_factory=list)  # R per item (for the KS test)


def eval_items(rows: Sequence[Row]) -> list[EvalItem]:
    return [to_eval_item({k: v for k, v in r.items() if k != "task_id"}) for r in rows]


@torch.no_grad()
def answer_probs(model, tokenizer, items: Sequence[EvalItem], relative: bool, batch_size: int) -> list[float]:
    """Length-normalised P(a|q), or its share against the perturbed answers when relative."""
    pad = pad_token_id(tokenizer)
    probs = []
    for item in items:
        answers = [item.answer or ""] + (list(item.perturbed_answers) if relative else [])
        scores = score_encodings(
            model, [encode_pair(tokenizer, item.prompt or "", a) for a in answers], pad, batch_size
        )
        values = [math.exp(-s.nll) for s in scores]
        probs.append(values[0] / sum(values) if relative else values[0])
    return probs


def score_set(model, tokenizer, rows: Sequence[Row], relative: bool, max_new_tokens: int = 48,
              batch_size: int = 8) -> SetScores:
    items = eval_items(rows)
    model.eval()
    probs = answer_probs(model, tokenizer, items, relative, batch_size)
    gens = generations(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ratios = truth_ratios(model, tokenizer, items, batch_size=batch_size)
    return SetScores(
        prob=statistics.fmean(probs),
        rouge_l=statistics.fmean(g.rouge_l_recall for g in gens),
        truth=statistics.fmean(max(0.0, 1.0 - r) for r in ratios) if ratios else float("nan"),
        ratios=ratios,
    )


def harmonic_mean(values: Sequence[float]) -> float:
    """0 if any value is 0 (TOFU: utility collapses when any part does)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def model_utility(scores: dict[str, SetScores]) -> float:
    return harmonic_mean(
        [v for name in UTILITY_SETS for v in (scores[name].prob, scores[name].rouge_l, scores[name].truth)]
    )


def forget_quality(ratios: Sequence[float], retain_model_ratios: Sequence[float]) -> float:
    """KS-test p-value of the forget-set truth ratios vs the retain model's (1.0: same distribution)."""
    if not ratios or not retain_model_ratios:
        return float("nan")
    return float(ks_2samp(list(ratios), list(retain_model_ratios)).pvalue)


@dataclass
class ModelScores:
    """One model's TOFU scores: per forget author (list) and per utility set."""

    forget: list[SetScores]
    utility_sets: dict[str, SetScores]

    @property
    def utility(self) -> float:
        return model_utility(self.utility_sets)

    @property
    def forget_ratios(self) -> list[float]:
        return [r for s in self.forget for r in s.ratios]

    @property
    def forget_rouge(self) -> float:
        return statistics.fmean(s.rouge_l for s in self.forget)

    @property
    def forget_prob(self) -> float:
        return statistics.fmean(s.prob for s in self.forget)


def score_model(model, tokenizer, forget_authors: Sequence[Sequence[Row]], sets: dict[str, Sequence[Row]],
                max_new_tokens: int = 48) -> ModelScores:
    """sets: retain, real_authors, world_facts rows."""
    forget = [score_set(model, tokenizer, author, relative=False, max_new_tokens=max_new_tokens)
              for author in forget_authors]
    utility = {name: score_set(model, tokenizer, sets[name], relative=name in RELATIVE_PROB_SETS,
                               max_new_tokens=max_new_tokens) for name in UTILITY_SETS}
    return ModelScores(forget, utility)
