"""Token log-probabilities of evaluation items under a causal LM: the base of every verification metric.

An item is free text (every token scored, after a BOS so the first token counts too) or a (prompt,
answer) pair (only the answer tokens scored, given the prompt). Pairs use the tokenizer's chat template
when it has one (prompt = user turn, answer = what follows the assistant header), else "prompt answer".

Per item: mean token NLL = -(1/|a|) sum_t log p(a_t | context, a_<t); probability = exp(-mean NLL) =
P(a | q)^(1/|a|), the length-normalised answer probability of TOFU (Maini et al. 2024).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from workers.engine.data import Example

MAX_EXP = 700.0  # math.exp overflows past ~709; a perplexity this large already means "destroyed"


@dataclass(frozen=True)
class EvalItem:
    """An item to score: text, or prompt + answer (optionally TOFU's paraphrased / perturbed answers)."""

    text: str | None = None
    prompt: str | None = None
    answer: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.prompt is None or self.answer is None):
            raise ValueError("an eval item has either 'text' or both 'prompt' and 'answer'")

    @property
    def is_pair(self) -> bool:
        return self.text is None


def _perturbed(row: dict[str, Any]) -> tuple[str, ...]:
    value = row.get("perturbed_answers", row.get("perturbed_answer", ()))
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def to_eval_item(item: EvalItem | Example | dict[str, Any]) -> EvalItem:
    """Accepts EvalItem, engine Example, or a JSON row ({text} | {prompt|question, answer, ...})."""
    if isinstance(item, EvalItem):
        return item
    if isinstance(item, Example):
        return EvalItem(text=item.text, prompt=item.prompt, answer=item.answer)
    if "text" in item:
        return EvalItem(text=str(item["text"]))
    prompt = item.get("prompt", item.get("question"))
    if prompt is None or "answer" not in item:
        raise ValueError(f"unrecognised eval item keys {sorted(item)}")
    paraphrased = item.get("paraphrased_answer")
    return EvalItem(
        prompt=str(prompt),
        answer=str(item["answer"]),
        paraphrased_answer=None if paraphrased is None else str(paraphrased),
        perturbed_answers=_perturbed(item),
    )


def to_eval_items(items: Iterable[EvalItem | Example | dict[str, Any]] | None) -> list[EvalItem]:
    return [to_eval_item(i) for i in items or ()]


@dataclass(frozen=True)
class Encoded:
    """Token ids of one item; ids[start:] are the scored targets (start >= 1)."""

    ids: list[int]
    start: int

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.start


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token that starts a sequence: BOS, else EOS (GPT-2's <|endoftext|> plays both roles)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Text tokens after a leading BOS (added if the tokenizer did not), so the first word is scored."""
    ids = list(tokenizer(text)["input_ids"])
    bos = prefix_token_id(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Context for an answer: the chat template's user turn + assistant header, else BOS + prompt."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return text_ids(tokenizer, prompt)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    spaced = answer if getattr(tokenizer, "chat_template", None) else " " + answer
    return list(tokenizer(spaced, add_special_tokens=False)["input_ids"])


def encode_text(tokenizer: Any, text: str, max_length: int = 256) -> Encoded:
    ids = text_ids(tokenizer, text)[:max_length]
    return Encoded(ids, start=1)


def encode_pair(tokenizer: Any, prompt: str, answer: str, max_length: int = 256) -> Encoded:
    """Prompt tokens then answer tokens; over-long pairs keep the prompt's end and the answer's start."""
    answer_part = answer_ids(tokenizer, answer)[: max(1, max_length // 2)]
    context = prompt_ids(tokenizer, prompt)[-(max_length - len(answer_part)) :]
    return Encoded(context + answer_part, start=len(context))


def encode_item(tokenizer: Any, item: EvalItem, max_length: int = 256) -> Encoded:
    if item.is_pair:
        return encode_pair(tokenizer, item.prompt or "", item.answer or "", max_length)
    return encode_text(tokenizer, item.text or "", max_length)


def model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def batches(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for begin in range(0, len(seq), max(1, size)):
        yield seq[begin : begin + size]


def collate(encodings: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask) (B, T) and target_mask (B, T-1): True where logits[:, t]
    predicts a scored token ids[t + 1]."""
    width = max(len(e.ids) for e in encodings)
    input_ids = torch.full((len(encodings), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encodings), width), dtype=torch.long)
    targets = torch.zeros((len(encodings), max(width - 1, 1)), dtype=torch.bool)
    for row, enc in enumerate(encodings):
        input_ids[row, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
        attention[row, : len(enc.ids)] = 1
        targets[row, enc.start - 1 : len(enc.ids) - 1] = True
    return input_ids.to(device), attention.to(device), targets.to(device)


def next_token_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """log p(. | x_<=t) for t = 0..T-2, float32: (B, T-1, V). Grad flows if enabled."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@dataclass(frozen=True)
class TokenScores:
    """Per scored token of one item: log p(x_t), and with moments the mean mu_t and std sigma_t of
    log p over the vocabulary under the model's own distribution (for Min-K%++)."""

    logprobs: Tensor  # (n,)
    mu: Tensor | None = None  # (n,)
    sigma: Tensor | None = None  # (n,)

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean()) if self.logprobs.numel() else float("nan")


def log_prob_moments(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """mu = sum_v p_v log p_v and sigma = sqrt(sum_v p_v (log p_v)^2 - mu^2) over the last dim.

    Vocabulary entries with p = 0 contribute 0 (not 0 * inf = nan).
    """
    probs = log_probs.exp()
    finite = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    mu = (probs * finite).sum(-1)
    second = (probs * finite.square()).sum(-1)
    sigma = (second - mu.square()).clamp_min(0).sqrt()
    return mu, sigma


def _row_scores(log_probs: Tensor, input_ids: Tensor, targets: Tensor, moments: bool) -> list[TokenScores]:
    picked = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mu, sigma = log_prob_moments(log_probs) if moments else (None, None)
    rows = []
    for b in range(input_ids.shape[0]):
        mask = targets[b, : picked.shape[1]]
        rows.append(
            TokenScores(
                picked[b][mask].cpu(),
                None if mu is None else mu[b][mask].cpu(),
                None if sigma is None else sigma[b][mask].cpu(),
            )
        )
    return rows


@torch.no_grad()
def score_encodings(
    model: nn.Module,
    encodings: Sequence[Encoded],
    pad_id: int = 0,
    batch_size: int = 8,
    moments: bool = False,
) -> list[TokenScores]:
    """TokenScores per encoding, in order; batched and padding-masked."""
    device = model_device(model)
    scores: list[TokenScores] = []
    for chunk in batches(encodings, batch_size):
        input_ids, attention, targets = collate(chunk, pad_id, device)
        log_probs = next_token_log_probs(model, input_ids, attention)
        scores.extend(_row_scores(log_probs, input_ids, targets, moments))
    return scores


def score_items(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[EvalItem],
    batch_size: int = 8,
    max_length: int = 256,
    moments: bool = False,
) -> list[TokenScores]:
    encodings = [encode_item(tokenizer, item, max_length) for item in items]
    return score_encodings(model, encodings, pad_token_id(tokenizer), batch_size, moments)


def mean_nll_loss(model: nn.Module, encodings: Sequence[Encoded], pad_id: int = 0) -> Tensor:
    """Differentiable mean token NLL over all scored tokens of a batch (used by the relearning probe)."""
    input_ids, attention, targets = collate(encodings, pad_id, model_device(model))
    log_probs = next_token_log_probs(model, input_ids, attention)
    picked = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    mask = targets[:, : picked.shape[1]]
    return -(picked * mask).sum() / mask.sum().clamp_min(1)


def safe_exp(value: float) -> float:
    return math.exp(min(value, MAX_EXP))


def nll_summary(scores: Sequence[TokenScores]) -> dict[str, float]:
    """nll: mean over items of the per-item mean token NLL; prob: mean over items of exp(-item NLL);
    ppl: exp(token-weighted mean NLL), the usual corpus perplexity. Items with no scored token are skipped."""
    scored = [s for s in scores if s.logprobs.numel()]
    if not scored:
        return {}
    item_nll = [s.nll for s in scored]
    total_tokens = sum(s.logprobs.numel() for s in scored)
    token_nll = -sum(float(s.logprobs.sum()) for s in scored) / total_tokens
    return {
        "nll": sum(item_nll) / len(item_nll),
        "prob": sum(math.exp(-v) for v in item_nll) / len(item_nll),
        "ppl": safe_exp(token_nll),
    }
