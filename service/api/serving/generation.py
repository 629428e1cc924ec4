"""Text generation for the OpenAI-compatible endpoints: prompt encoding, sampling, incremental decoding with
stop strings and the pending-request guard. The loop that runs them is the batch scheduler (scheduler.py);
the forward passes (KV cache) and the stop tokens are the engine's (workers.engine.decoding), shared with
verification and retain generation.

Sampling per step (logits z of the last position, (n, V)):
    temperature 0:  argmax z                                  (greedy: bit-identical across runs)
    otherwise:      p = softmax(z / T); nucleus (Holtzman et al. 2020): keep the smallest set of tokens whose
                    cumulative p reaches top_p, renormalise, draw with a torch.Generator seeded by `seed`.
The n choices of one prompt are n rows of the batch, sampled together with the request's own generator.

torch is imported inside the functions that run the model: an API process that serves no model never
loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.api.serving.guard import REFUSAL, OutputGuard

REPLACEMENT_CHAR = "\ufffd"  # a trailing one may be an unfinished multi-byte character

# (choice index, text delta, finish_reason or None) -> None
OnDelta = Callable[[int, str, "str | None"], None]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str
    tokens: int  # generated tokens, end-of-sequence included


@dataclass
class GenerationResult:
    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    guard_refusals: int = 0


# ------------------------------------------------------------------ prompts


def content_text(content: str | Sequence[Any]) -> str:
    """A message's content: a string, or OpenAI content parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] if isinstance(part, dict) else part.text for part in content)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The tokenizer's chat template with the assistant header appended; a plain transcript without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(transcript)["input_ids"])


def completion_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def context_length(model: Any) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


# ------------------------------------------------------------------ one choice's text


class ChoiceText:
    """Tokens of one choice -> text deltas that are safe to send: never part of a stop string, never an
    unfinished UTF-8 character, never the start of a pending forget item (the guard)."""

    def __init__(self, index: int, tokenizer: Any, params: SamplingParams, guard: OutputGuard) -> None:
        self.index, self.tokenizer, self.params, self.guard = index, tokenizer, params, guard
        self.ids: list[int] = []
        self.tokens = 0
        self.text = ""
        self.sent = 0  # chars of self.text already handed out
        self.finish_reason: str | None = None
        self.refused = False

    def push(self, token_id: int, stop_ids: frozenset[int]) -> str:
        """Take one generated token; returns the text delta to send now."""
        self.tokens += 1
        if token_id in stop_ids:
            return self.finish("stop")
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop_string()
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop")
        if self.guard.reproduces(self.text):
            return self._refuse()
        if len(self.ids) >= self.params.max_new_tokens:
            return self.finish("length")
        return self._take(self._safe_length())

    def finish(self, reason: str) -> str:
        """End the choice; returns the rest of its text (after a last full guard check)."""
        if self.guard.reproduces(self.text, final=True):
            return self._refuse()
        self.finish_reason = reason
        return self._take(len(self.text))

    def _refuse(self) -> str:
        """Replace what is not yet sent by the refusal (what was sent never held a match: see safe_length)."""
        self.refused, self.finish_reason = True, "content_filter"
        sent = self.text[:self.sent]
        self.text = sent + ("" if not sent or sent[-1].isspace() else " ") + REFUSAL
        return self._take(len(self.text))

    def _first_stop_string(self) -> int | None:
        hits = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_length(self) -> int:
        safe = len(self.text.rstrip(REPLACEMENT_CHAR))
        for stop in self.params.stop:  # hold back a suffix that may grow into a stop string
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return min(safe, self.guard.safe_length(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:upto], upto
        return delta


# ------------------------------------------------------------------ decoding


def sample_next(logits: Any, params: SamplingParams, generator: Any) -> Any:
    """(n, V) float logits -> (n,) token ids."""
    import torch

    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
