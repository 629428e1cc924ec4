"""Membership inference: can an attacker still tell forget items from unseen (held-out) ones?

Per item score (higher = "looks like training data"):
- loss:     mean log p(x_t) over the scored tokens (= -NLL).
- Min-K%:   mean of the lowest k% token log-probs (Shi et al. 2024, "Detecting Pretraining Data from
            Large Language Models").
- Min-K%++: same over z_t = (log p(x_t) - mu_t) / sigma_t with mu_t, sigma_t the mean and std of
            log p(z) for z ~ p(. | x_<t) (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting
            Pre-Training Data from Large Language Models").
AUC = P(score(forget) > score(holdout)) + P(tie)/2 (Mann-Whitney U / (n_f n_h)): 0.5 means the two sets
look alike to the attacker, 1.0 means every forget item looks more "seen" than every held-out one.

PrivLeak (Shi et al. 2024, MUSE): (AUC_model - AUC_ref) / AUC_ref. MUSE's reference is a model retrained
without the forget set; this service has none, so the reference is the base model before unlearning.
Sign convention: 0 = as distinguishable as before; negative = forget items now look less like members
than they did (the unlearning removed membership signal); positive = they leak more. A strongly negative
value with AUC well below 0.5 means over-unlearning: forget items stand out by being *too* unlikely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scipy.stats import mannwhitneyu
from torch import Tensor

from .scoring import TokenScores

SIGMA_FLOOR = 1e-6  # a one-hot next-token distribution has sigma = 0


def _lowest_k_mean(values: Tensor, k: float) -> float:
    """Mean of the ceil(k * n) smallest values (at least one)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    count = max(1, math.ceil(k * values.numel()))
    return float(torch.topk(values.double(), count, largest=False).values.mean())


def loss_score(logprobs: Tensor) -> float:
    return float(logprobs.double().mean())


def min_k_score(logprobs: Tensor, k: float = 0.2) -> float:
    """Min-K%: mean of the lowest k fraction of token log-probs."""
    return _lowest_k_mean(logprobs, k)


def min_k_plus_plus_score(logprobs: Tensor, mu: Tensor, sigma: Tensor, k: float = 0.2) -> float:
    """Min-K%++: mean of the lowest k fraction of (log p(x_t) - mu_t) / sigma_t."""
    z = (logprobs.double() - mu.double()) / sigma.double().clamp_min(SIGMA_FLOOR)
    return _lowest_k_mean(z, k)


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of separating members (forget) from non-members (holdout), higher score = member."""
    if not member_scores or not nonmember_scores:
        raise ValueError("AUC needs at least one score on each side")
    u_statistic = mannwhitneyu(list(member_scores), list(nonmember_scores), alternative="two-sided").statistic
    return float(u_statistic) / (len(member_scores) * len(nonmember_scores))


def privleak(auc_model: float, auc_reference: float) -> float:
    """MUSE PrivLeak = (AUC_model - AUC_ref) / AUC_ref (see module docstring for the sign)."""
    return (auc_model - auc_reference) / auc_reference


def item_scores(scores: Sequence[TokenScores], k: float = 0.2) -> dict[str, list[float]]:
    """Per-item attack scores; items with no scored token are skipped. Min-K%++ needs moments."""
    scored = [s for s in scores if s.logprobs.numel()]
    result = {
        "loss": [loss_score(s.logprobs) for s in scored],
        "min_k": [min_k_score(s.logprobs, k) for s in scored],
    }
    if all(s.mu is not None and s.sigma is not None for s in scored):
        result["min_k_pp"] = [
            min_k_plus_plus_score(s.logprobs, s.mu, s.sigma, k)  # type: ignore[arg-type]
            for s in scored
        ]
    return result


def mia_aucs(
    forget: Sequence[TokenScores], holdout: Sequence[TokenScores], k: float = 0.2
) -> dict[str, float]:
    """{auc_loss, auc_min_k, auc_min_k_pp} of forget vs holdout ({} if either side is empty)."""
    member, nonmember = item_scores(forget, k), item_scores(holdout, k)
    if not member["loss"] or not nonmember["loss"]:
        return {}
    return {f"auc_{name}": auc(member[name], nonmember[name]) for name in member if name in nonmember}
