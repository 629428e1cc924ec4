"""Did the model memorise a forget item at all? Evidence relative to references it could not have learned.

Each item is a cue and a target: a pair's prompt and answer; a text's first and second half of tokens (as
verbatim extraction splits it). Three signals, all computed from the model's outputs:

- reproduction: ROUGE-L recall of the model's greedy continuation of the cue against the target's *new*
  words, those not already in the cue. An answer that restates its question ("What is X's code?" -> "X's
  code is 4471") is reproduced only if the model says "4471": copying the question is no memory of X.
- truth ratio against the model's own answers (R_truth of TOFU, Maini et al. 2024, with references of the
  same length sampled from the model itself at temperature 1, and the geometric mean over references as
  TOFU's code takes it, steadier than the arithmetic mean with a few samples):
      R = exp(NLL(target | cue) - mean_j NLL(ref_j | cue))      (per-token NLLs)
  over the content tokens the cue does not hold (an answer that restates its question is judged on what it
  adds). On text it never saw, a model's per-token cross-entropy is at least its own entropy, so the target
  is no likelier than what it says itself: R >= ~1. A memorised target is far likelier per token: R << 1.
- sampled reproduction: samples that reproduce the target are the memory showing, not references; when
  most samples do, the item is memorised.

An item is memorised when any signal says so: reproduction >= min_reproduction, R < max_truth_ratio, or
more than half the samples reproduce it. Measured on the default model (SmolLM2-135M-Instruct;
benchmarks/results/memorization.md, `unlearn bench memorization`): facts it answers reproduce at recall
1.0; a famous text it half knows has R = 0.16; made-up codes, badge numbers and people have R between 0.32
and 6.7 and recall <= 0.2. Sampled references make R noisy (about +-0.5 nats), hence the bar R < 0.2: the
target at least 5x likelier per token than the model's own answers.

A request is worth unlearning only if at least one item is memorised: otherwise the honest outcome is
"not memorised", with this evidence, and no new model version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rouge_score import tokenize
from torch import nn

from ..decoding import sample_generate, stop_token_ids
from .extraction import generations, rouge_l_recall, split_text
from .scoring import Encoded, EvalItem, answer_ids, pad_token_id, prompt_ids, safe_exp, score_encodings


@dataclass(frozen=True)
class MemorizationConfig:
    min_reproduction: float = 0.5  # greedy ROUGE-L recall of the target at or above: reproduced
    max_truth_ratio: float = 0.2  # target at least 5x likelier per token than the model's own answers
    n_references: int = 16
    max_target_tokens: int = 48
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class ItemEvidence:
    reproduction: float  # ROUGE-L recall of the greedy continuation against the target's new words
    truth_ratio: float | None  # exp(NLL(target) - mean_j NLL(ref_j)), per token; None: no reference left
    target_nll: float  # mean per-token NLL of the target given the cue
    reference_nll: float | None  # mean per-token NLL of the model's own sampled answers
    samples_reproducing: int  # sampled answers that reproduce the target: memory, so not used as references
    memorized: bool


def _cue_and_target(tokenizer: Any, item: EvalItem, max_target: int) -> tuple[list[int], list[int]]:
    if item.is_pair:
        return prompt_ids(tokenizer, item.prompt or ""), answer_ids(tokenizer, item.answer or "")[:max_target]
    cue, target = split_text(tokenizer, item.text or "", 256)  # the split `generations` uses
    return cue, target[:max_target]


def new_words(target: str, cue: str) -> str:
    """The target's words that the cue does not already contain, in order (rouge-score's tokenizer)."""
    known = set(tokenize.tokenize(cue, None))
    return " ".join(w for w in tokenize.tokenize(target, None) if w not in known)


def _cue_text(tokenizer: Any, item: EvalItem, cue: list[int]) -> str:
    return item.prompt or "" if item.is_pair else tokenizer.decode(cue, skip_special_tokens=True)


def item_evidence(model: nn.Module, tokenizer: Any, items: list[EvalItem],
                  cfg: MemorizationConfig | None = None) -> list[ItemEvidence]:
    """One ItemEvidence per item, in order."""
    cfg = cfg or MemorizationConfig()
    was_training = model.training
    model.eval()
    try:
        cues_targets = [_cue_and_target(tokenizer, item, cfg.max_target_tokens) for item in items]
        cue_texts = [_cue_text(tokenizer, item, cue) for item, (cue, _) in zip(items, cues_targets)]
        greedy = generations(model, tokenizer, items, cfg.max_target_tokens, cfg.batch_size)
        references = _sample_references(model, tokenizer, cues_targets, cfg)
        evidence = []
        for index, (cue, target) in enumerate(cues_targets):
            novel = new_words(greedy[index].reference, cue_texts[index])
            reproduction = rouge_l_recall(novel, greedy[index].text)
            # a sample that reproduces the target is the memory showing, not a reference of the same shape
            sampled = [r for r in references[index] if r]  # a sample that stopped at once has nothing to score
            refs = [r for r in sampled if rouge_l_recall(novel, tokenizer.decode(r, skip_special_tokens=True))
                    < cfg.min_reproduction]
            samples_reproducing = len(sampled) - len(refs)
            target_nll, *ref_nll = _new_token_nll(model, tokenizer, cue, cue_texts[index], [target, *refs],
                                                  cfg.batch_size)
            ratio = safe_exp(target_nll - sum(ref_nll) / len(ref_nll)) if ref_nll else None
            evidence.append(ItemEvidence(
                reproduction=round(reproduction, 4), truth_ratio=None if ratio is None else round(ratio, 4),
                target_nll=round(target_nll, 4),
                reference_nll=round(sum(ref_nll) / len(ref_nll), 4) if ref_nll else None,
                samples_reproducing=samples_reproducing,
                memorized=(reproduction >= cfg.min_reproduction or 2 * samples_reproducing > cfg.n_references
                           or (ratio is not None and ratio < cfg.max_truth_ratio)),
            ))
        return evidence
    finally:
        model.train(was_training)


def _new_token_nll(model: nn.Module, tokenizer: Any, cue: list[int], cue_text: str, answers: list[list[int]],
                   batch_size: int) -> list[float]:
    """Mean NLL of each answer given the cue over its content tokens that the cue does not hold (all of them if
    it has no other): words an answer copies from its question, and punctuation, say nothing about what the
    model remembers."""
    scores = score_encodings(model, [Encoded(cue + a, len(cue)) for a in answers], pad_token_id(tokenizer),
                             batch_size)
    known = cue_text.lower()
    result = []
    for answer, score in zip(answers, scores):
        pieces = [_content(tokenizer.decode([token])) for token in answer[:len(score.logprobs)]]
        keep = [i for i, piece in enumerate(pieces) if piece and piece not in known]
        picked = score.logprobs[keep] if keep else score.logprobs
        result.append(float(-picked.double().mean()))
    return result


def _content(piece: str) -> str:
    return "".join(ch for ch in piece.lower() if ch.isalnum())


def _sample_references(model: nn.Module, tokenizer: Any, cues_targets: list[tuple[list[int], list[int]]],
                       cfg: MemorizationConfig) -> list[list[list[int]]]:
    """cfg.n_references sampled answers per cue, each at most as long as that cue's target."""
    stops, pad = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    budget = max((len(t) for _, t in cues_targets), default=1)
    prompts = [cue for cue, _ in cues_targets for _ in range(cfg.n_references)]
    sampled = sample_generate(model, prompts, max(1, budget), cfg.seed, pad, stops, cfg.batch_size)
    per_item = []
    for index, (_cue, target) in enumerate(cues_targets):
        rows = sampled[index * cfg.n_references:(index + 1) * cfg.n_references]
        per_item.append([row[:len(target)] for row in rows])
    return per_item


def memorization_report(model: nn.Module, tokenizer: Any, items: list[EvalItem],
                        cfg: MemorizationConfig | None = None) -> dict[str, Any]:
    """JSON-ready evidence for a request: per item numbers (never the text), counts, and the decision."""
    cfg = cfg or MemorizationConfig()
    evidence = item_evidence(model, tokenizer, items, cfg)
    n_memorized = sum(e.memorized for e in evidence)
    return {
        "memorized": n_memorized > 0,
        "n_items": len(evidence),
        "n_memorized": n_memorized,
        "criteria": {"min_reproduction": cfg.min_reproduction, "max_truth_ratio": cfg.max_truth_ratio,
                     "n_references": cfg.n_references},
        "items": [asdict(e) for e in evidence],
    }
