"""The retain set a request is trained against: what the unlearning layer must leave unchanged.

Sources, in order: the request's own `retain` examples, then the operator's retain corpus (JSONL of
{"text"} | {"prompt", "answer"} | {"question", "answer"} | {"prompt"} | {"question"}, at most n rows; a
row without an answer is answered by the base model itself, once, cached), then, while fewer than n
examples were found, a built-in set of generic prompts (everyday knowledge, instructions, small talk)
answered by the base model itself (greedy, short): training to keep those answers keeps the model's
general behaviour. The top-up matters: measured on SmolLM2-135M, a retain set of a few items lets
the forget terms drag down everything that looks like the forget data.
Those answers are generated once per model and cached under cache_dir ({question: answer}, one file per
model source sha256 and answer recipe), so every later request reuses them. On top comes the request's
neighbourhood (neighbours.py): the same kind of knowledge about other subjects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .batching import pad_id, prompt_ids
from .data import Example, read_corpus
from .decoding import greedy_generate, stop_token_ids

GENERIC_PROMPTS: tuple[str, ...] = (
    "What is the boiling point of water at sea level?",
    "Why is the sky blue? Answer in one sentence.",
    "How many days are there in a leap year?",
    "What do bees make?",
    "Name three primary colors.",
    "What is the largest planet in our solar system?",
    "In one sentence, what is photosynthesis?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What language is spoken in Brazil?",
    "Give me a tip for sleeping better.",
    "How do I boil an egg?",
    "Write a short sentence about autumn.",
    "Suggest a name for a pet cat.",
    "How can I make my handwriting neater?",
    "Translate 'good morning' into French.",
    "Summarise the plot of Cinderella in one sentence.",
    "What is 12 times 12?",
    "List two benefits of regular exercise.",
    "Explain what a noun is.",
    "Write a haiku about the sea.",
    "How should I store fresh bread?",
    "Hello! How are you today?",
    "Can you tell me a fun fact?",
    "What's a good way to start a conversation with a new colleague?",
    "Thank you for your help!",
    "What should I cook for dinner tonight?",
    "Tell me a short joke.",
    "What is your favourite season and why?",
    "How do plants get water?",
    "What does a thermometer measure?",
    "Why do we need to drink water?",
)
CONTINUATION_TOKENS = 48
_SENTENCE_END = re.compile(r"^(.*[.!?])(\s|$)", re.DOTALL)


def trim_to_sentence(text: str) -> str:
    """Cut a continuation after its last full sentence, so no answer ends mid-word."""
    text = text.strip()
    match = _SENTENCE_END.match(text)
    return match.group(1).strip() if match else text


def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int = 8) -> list[str]:
    """The model's own greedy answers, prompted like the served chat model, cut after the last sentence."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    stops = stop_token_ids(model, tokenizer)
    outputs = greedy_generate(model, encoded, max_new_tokens, pad_id(tokenizer), stops, batch_size)
    return [trim_to_sentence(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in outputs]


def answer_cache_path(cache_dir: Path, model_key: str) -> Path:
    """One JSON object {question: answer} per model and answer recipe."""
    recipe = json.dumps({"max_new_tokens": CONTINUATION_TOKENS, "trim": "sentence"}).encode()
    return Path(cache_dir) / "retain" / f"{model_key[:16]}-{hashlib.sha256(recipe).hexdigest()[:12]}.json"


def _read_cache(path: Path | None) -> dict[str, str]:
    if path is None or not path.exists():
        return {}
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # a cache is never the only copy of anything: a bad one is regenerated
        return {}
    return {str(k): str(v) for k, v in cached.items()} if isinstance(cached, dict) else {}


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generic_retain(model: nn.Module, tokenizer, cache_dir: Path | None, model_key: str) -> list[Example]:
    """The built-in prompts with the model's own answers (cached per model when cache_dir is given)."""
    return own_answers(model, tokenizer, GENERIC_PROMPTS, cache_dir, model_key)


def own_answers(model: nn.Module, tokenizer, prompts: Sequence[str], cache_dir: Path | None,
                model_key: str) -> list[Example]:
    """`prompts` with the model's own greedy answers; with cache_dir, each answer is generated once per model.

    Only pass cache_dir for questions that may live on disk (built-in or operator ones): never for
    questions made from a request's own text. Two workers filling the cache at once may each write
    their own answers; the file is replaced atomically, so at worst an answer is generated again.
    """
    prompts = tuple(prompts)
    path = answer_cache_path(cache_dir, model_key) if cache_dir is not None else None
    cached = _read_cache(path)
    missing = list(dict.fromkeys(p for p in prompts if p not in cached))
    if missing:
        cached |= dict(zip(missing, greedy_answers(model, tokenizer, missing, CONTINUATION_TOKENS)))
        if path is not None:
            write_atomically(path, json.dumps(_read_cache(path) | cached, ensure_ascii=False, sort_keys=True))
    return [Example(prompt=p, answer=cached[p]) for p in prompts]  # "" = it stops at once


def build_retain(
    request_retain: Sequence[Example] | None,
    corpus_path: str | Path | None,
    model: nn.Module,
    tokenizer,
    cache_dir: str | Path | None,
    n: int = 32,
    *,
    model_key: str,
    neighbours: Sequence[Example] = (),
) -> list[Example]:
    """Request retain items + the request's neighbourhood + up to n corpus rows, topped up to n with the
    generic set. The neighbourhood (neighbours.py) comes on top of n: it keeps what the model knows about
    subjects like the forgotten one, the generic set keeps its everyday behaviour; both are needed.

    With neither request items nor a corpus that is the first n generic prompts. model_key names the
    model in the cache (pass LoadedModel.source_sha256). Corpus rows that are bare prompts get the base
    model's own answers, the better retain target: the KL and NLL terms then hold the model to what it
    actually says (measured on SmolLM2-135M: forgetting one world fact lost 2 of 10 other facts with 24
    reference answers as retain, 1 with the model's own answers).
    """
    examples = list(request_retain or [])
    cache = Path(cache_dir) if cache_dir is not None else None
    if corpus_path is not None:
        given, prompts = read_corpus(corpus_path)
        examples += given[:n]
        room = n - len(given[:n])
        if prompts and room > 0:  # no generation when the given rows already fill the set
            examples += own_answers(model, tokenizer, prompts[:room], cache, model_key)
    missing = n - len(examples)
    if missing > 0:
        examples += generic_retain(model, tokenizer, cache, model_key)[:missing]
    return examples[:len(request_retain or [])] + list(neighbours) + examples[len(request_retain or []):]
