"""The verification suite: one call measures a model on forget, retain, general and held-out data.

`evaluate` is run before and after unlearning; `verdict.judge(before, after, thresholds)` compares them.
Every number is evidence, not proof of erasure: a model can hide knowledge that a stronger probe (or a
few steps of fine-tuning, see relearn.py) brings back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from torch import nn

from .extraction import generations, truth_ratios
from .mia import mia_aucs, privleak
from .scoring import EvalItem, TokenScores, encode_item, nll_summary, pad_token_id, score_items, to_eval_items
from .utility import ReferenceCtx, kl_to_reference, reference_scope, token_entropy

RESOURCES = "workers.engine.resources"
GENERAL_PAIR_FILES = ("world_facts_perturbed.jsonl", "real_authors_perturbed.jsonl")
GENERAL_TEXT_FILE = "general_text.txt"


@dataclass(frozen=True)
class EvalConfig:
    """Sizes of one evaluation.

    Cost is dominated by greedy generation (max_new_tokens per item) and the truth ratio (one forward per
    perturbed answer). Measured on SmolLM2-135M, 2 shared CPU cores: 10 TOFU forget + the 24 default general
    items ~ 1 minute; generate=False or smaller caps for quicker runs.
    """

    max_new_tokens: int = 32  # per greedy generation
    batch_size: int = 8
    max_length: int = 256  # tokens per scored item
    max_forget: int = 32  # items kept per set (the first N, so runs are comparable)
    max_retain: int = 32
    max_general: int = 24
    max_holdout: int = 32
    max_neighbours: int = 32
    min_k: float = 0.2  # fraction of tokens for Min-K% / Min-K%++
    entropy_ngram: int = 1
    generate: bool = True  # off: likelihood metrics only (no ROUGE, no token entropy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spread(rows: Sequence[Any], count: int) -> list[Any]:
    """`count` rows evenly spaced over the whole list (deterministic, covers every part of the file)."""
    if count >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // count] for i in range(count)]


def _resource_lines(name: str) -> list[str]:
    text = resources.files(RESOURCES).joinpath(name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def general_set(max_pairs: int = 16, max_texts: int = 8) -> list[EvalItem]:
    """Fixed general-utility set: TOFU world-facts and real-author questions (with perturbed answers, so
    the truth ratio applies), half from each, then generic sentences. Same call, same items."""
    pairs: list[EvalItem] = []
    share = [max_pairs - max_pairs // 2, max_pairs // 2]
    for name, count in zip(GENERAL_PAIR_FILES, share):
        rows = [json.loads(line) for line in _resource_lines(name)]
        pairs.extend(to_eval_items(_spread(rows, count)))
    texts = [EvalItem(text=line) for line in _spread(_resource_lines(GENERAL_TEXT_FILE), max_texts)]
    return pairs + texts


def _mean(values: Iterable[float]) -> float | None:
    listed = list(values)
    return sum(listed) / len(listed) if listed else None


def _put(metrics: dict[str, Any], key: str, value: float | None) -> None:
    if value is not None:  # absent beats null: every stored value is a number
        metrics[key] = float(value)


def _generation_metrics(
    model: nn.Module, tokenizer: Any, items: Sequence[EvalItem], cfg: EvalConfig
) -> dict[str, Any]:
    outputs = generations(model, tokenizer, items, cfg.max_new_tokens, cfg.batch_size, cfg.max_length)
    metrics: dict[str, Any] = {}
    _put(metrics, "rougeL", _mean(g.rouge_l_recall for g in outputs))
    _put(
        metrics, "extraction_rougeL", _mean(g.rouge_l_recall for g, i in zip(outputs, items) if not i.is_pair)
    )
    _put(metrics, "answer_rougeL", _mean(g.rouge_l_recall for g, i in zip(outputs, items) if i.is_pair))
    _put(metrics, "token_entropy", token_entropy([g.tokens for g in outputs], cfg.entropy_ngram))
    return metrics


def set_metrics(
    model: nn.Module, tokenizer: Any, items: Sequence[EvalItem], cfg: EvalConfig, moments: bool = False
) -> tuple[dict[str, Any], list[TokenScores]]:
    """Metrics of one set (n, nll, prob, ppl, rougeL, extraction_rougeL, answer_rougeL, token_entropy,
    truth_ratio, truth_score; each only where it applies) and the per-item token scores."""
    if not items:
        return {"n": 0}, []
    scores = score_items(model, tokenizer, items, cfg.batch_size, cfg.max_length, moments)
    metrics: dict[str, Any] = {"n": len(items), **nll_summary(scores)}
    if cfg.generate:
        metrics.update(_generation_metrics(model, tokenizer, items, cfg))
    ratios = truth_ratios(model, tokenizer, items, cfg.batch_size, cfg.max_length)
    _put(metrics, "truth_ratio", _mean(ratios))
    _put(
        metrics, "truth_score", _mean(max(0.0, 1.0 - r) for r in ratios)
    )  # TOFU utility form: 1 = prefers truth
    return metrics, scores


def _mia_metrics(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[EvalItem],
    forget_scores: list[TokenScores],
    holdout: Sequence[EvalItem],
    cfg: EvalConfig,
    reference: dict[str, Any] | None,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"n_forget": len(forget), "n_holdout": len(holdout)}
    if not forget or not holdout:
        return metrics
    holdout_scores = score_items(model, tokenizer, holdout, cfg.batch_size, cfg.max_length, moments=True)
    metrics.update(mia_aucs(forget_scores, holdout_scores, cfg.min_k))
    if reference is None:
        return metrics
    with reference_scope(model, **reference) as base:
        base_forget = score_items(base, tokenizer, forget, cfg.batch_size, cfg.max_length, moments=True)
        base_holdout = score_items(base, tokenizer, holdout, cfg.batch_size, cfg.max_length, moments=True)
    for name, base_auc in mia_aucs(base_forget, base_holdout, cfg.min_k).items():
        metrics[f"base_{name}"] = base_auc
        if name in metrics and base_auc > 0:
            metrics[f"privleak_{name.removeprefix('auc_')}"] = privleak(metrics[name], base_auc)
    return metrics


def evaluate_forget(model: nn.Module, tokenizer: Any, forget: Iterable[Any], cfg: EvalConfig | None = None,
                    ) -> dict[str, Any]:
    """The "forget" section of `evaluate` alone: an earlier request's items re-checked on a later model."""
    cfg = cfg or EvalConfig()
    was_training = model.training
    model.eval()
    try:
        return set_metrics(model, tokenizer, to_eval_items(forget)[: cfg.max_forget], cfg)[0]
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    forget: Iterable[Any],
    retain: Iterable[Any] | None = None,
    general: Iterable[Any] | None = None,
    holdout: Iterable[Any] | None = None,
    reference_ctx: ReferenceCtx | None = None,
    cfg: EvalConfig | None = None,
    reference_model: nn.Module | None = None,
    neighbours: Iterable[Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """{"forget", "retain", "general", "mia"} (+ "neighbours" when given) -> metrics (JSON numbers only).

    neighbours: the request's neighbour probe set (neighbours.py), questions about other subjects of the
    same kind with the base model's answers: its rougeL and nll before vs after are the neighbour check.

    Items: engine Examples, EvalItems or JSON rows. general=None uses the built-in `general_set()`.
    With a reference (reference_ctx factory, e.g. `attached.disabled`, or reference_model) the general set
    also gets kl_to_base, and mia gets the base model's AUCs and PrivLeak. The model is put in eval mode
    for the duration and restored after.
    """
    cfg = cfg or EvalConfig()
    forget_items = to_eval_items(forget)[: cfg.max_forget]
    retain_items = to_eval_items(retain)[: cfg.max_retain]
    general_items = (general_set() if general is None else to_eval_items(general))[: cfg.max_general]
    holdout_items = to_eval_items(holdout)[: cfg.max_holdout]
    has_reference = reference_ctx is not None or reference_model is not None
    reference = (
        {"reference_ctx": reference_ctx, "reference_model": reference_model} if has_reference else None
    )
    was_training = model.training
    model.eval()
    try:
        forget_metrics, forget_scores = set_metrics(
            model, tokenizer, forget_items, cfg, moments=bool(holdout_items)
        )
        retain_metrics, _ = set_metrics(model, tokenizer, retain_items, cfg)
        general_metrics, _ = set_metrics(model, tokenizer, general_items, cfg)
        if reference is not None and general_items:
            encodings = [encode_item(tokenizer, item, cfg.max_length) for item in general_items]
            general_metrics["kl_to_base"] = kl_to_reference(
                model, encodings, pad_id=pad_token_id(tokenizer), batch_size=cfg.batch_size, **reference
            )
        mia = _mia_metrics(model, tokenizer, forget_items, forget_scores, holdout_items, cfg, reference)
        sections = {"forget": forget_metrics, "retain": retain_metrics, "general": general_metrics, "mia": mia}
        if neighbours is not None:
            sections["neighbours"] = set_metrics(model, tokenizer, to_eval_items(neighbours)[: cfg.max_neighbours],
                                                 cfg)[0]
    finally:
        model.train(was_training)
    return sections
