"""Tokenise examples for causal-LM training and iterate over them in seeded batches.

A (prompt, answer) pair is laid out the way the served chat model is queried: with the tokenizer's
chat template when it has one (prompt = user turn, answer = assistant turn, closed by the end-of-turn
/ eos token), else as "prompt answer<eos>". Only the answer tokens are scored: the prompt and the
padding get label -100. Free text is scored everywhere. Padding is on the right.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import lru_cache
from importlib import resources

import torch
from torch import Tensor

from .data import Example
from .objectives.base import IGNORE_INDEX

Encoded = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}, same length


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad nor an eos token")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids the model sees before the answer starts (chat: up to and incl. the assistant header)."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's ids, closed with eos (= end of turn for chat models) so "stop here" is learnt too."""
    text = answer if has_chat_template(tokenizer) else " " + answer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_example(tokenizer, example: Example, max_length: int) -> Encoded:
    if not example.is_pair:
        ids = list(tokenizer(example.text)["input_ids"])[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    context = prompt_ids(tokenizer, example.prompt or "")
    target = answer_ids(tokenizer, example.answer or "")
    ids = (context + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(context) + target)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):  # prompt alone fills max_length: keep the answer
        ids = (context + target)[-max_length:]
        labels = ([IGNORE_INDEX] * len(context) + target)[-max_length:]
    return {"input_ids": ids, "labels": labels}


def encode(tokenizer, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    return [encode_example(tokenizer, example, max_length) for example in examples]


def collate(items: Sequence[Encoded], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest item: input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def index_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` lists of indices into n items: a fresh seeded permutation per pass, cycled as needed.

    Batches hold min(batch_size, n) distinct items. Same (n, batch_size, steps, seed) -> same lists,
    which is how two streams built from the same source list (retain, retain_refusal) stay aligned.
    """
    if n <= 0:
        raise ValueError("cannot batch an empty list of examples")
    size = min(batch_size, n)
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    for _ in range(steps):
        if len(pending) < size:
            pending += torch.randperm(n, generator=generator).tolist()
        batch, pending = pending[:size], pending[size:]
        if len(set(batch)) < size:  # a pass boundary repeated an item: take the next distinct ones
            batch = list(dict.fromkeys(batch + pending))[:size]
            pending = [i for i in pending if i not in batch]
        yield batch


def batches(
    encoded: Sequence[Encoded], batch_size: int, steps: int, seed: int, pad_token_id: int
) -> Iterator[dict[str, Tensor]]:
    for indices in index_batches(len(encoded), batch_size, steps, seed):
        yield collate([encoded[i] for i in indices], pad_token_id)


# ---- derived example lists for the objectives that need them -----------------------------------


@lru_cache(maxsize=1)
def load_refusals() -> tuple[str, ...]:
    """The "I don't know" sentences of resources/refusals.txt (one per line)."""
    text = resources.files("workers.engine").joinpath("resources/refusals.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def prompt_of(example: Example) -> str:
    """The question part of an example: its prompt, or the first half of a free text's words."""
    if example.is_pair:
        return example.prompt or ""
    words = (example.text or "").split()
    return " ".join(words[: max(1, len(words) // 2)])


def response_of(example: Example) -> str:
    return (example.answer if example.is_pair else example.text) or ""


def with_random_answers(
    prompts_from: Sequence[Example], answers: Sequence[str], variants: int, seed: int
) -> list[Example]:
    """Each example's prompt paired with `variants` answers drawn (seeded) from `answers`."""
    if not answers:
        raise ValueError("no answers to draw from")
    rng = random.Random(seed)
    return [
        Example(prompt=prompt_of(example), answer=rng.choice(answers))
        for example in prompts_from
        for _ in range(variants)
    ]


def refusals_for(examples: Sequence[Example], seed: int, variants: int = 1) -> list[Example]:
    """Each example's prompt answered with a random refusal sentence (row i <- examples[i // variants])."""
    return with_random_answers(examples, load_refusals(), variants, seed)


def mismatched(forget: Sequence[Example], retain: Sequence[Example], seed: int, variants: int = 4) -> list[Example]:
    """Forget prompts answered with random retain responses (Yao et al. 2023's random mismatch)."""
    return with_random_answers(forget, [response_of(e) for e in retain], variants, seed)
