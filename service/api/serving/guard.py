"""Output guard for pending deletion requests. A STOPGAP, NOT ERASURE.

While a deletion request is queued or running its data is still in the served weights. The guard makes the
service refuse a completion that reproduces one of the request's forget items verbatim; the model itself is
unchanged and still "knows" the data (a paraphrasing prompt, a translation, or logprobs can still surface
it). It is the output-filter form of in-context unlearning (Pawelczyk et al. 2023, "In-Context Unlearning";
survey section on unlearning without weight updates), and it is switched off for a request as soon as its
job ends: the fused version is active in this process (the weights now carry the forgetting) or the job
failed / was cancelled (then the data was never removed, and the guard is not a substitute).

Match rule, on words (lower-cased runs of \\w: independent of the tokenizer, spacing, punctuation, case):
an output reproduces an item when it contains a run of w consecutive words that also occurs in the item,
w = min(ngram, words in the item). Items with fewer than MIN_ITEM_WORDS words are not guarded: a one-word
answer ("Canberra", "male") would refuse every output that mentions the word. For a {prompt, answer}
item only the answer is guarded (the question is not the data).

The item texts live only in this process's memory (never logged, never written), as word n-gram sets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

WORD = re.compile(r"\w+")
MIN_ITEM_WORDS = 4
REFUSAL = "I'm sorry, but I can't provide that content."

Gram = tuple[str, ...]


def words_of(text: str) -> list[str]:
    return [m.group(0).lower() for m in WORD.finditer(text)]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """(lower-cased word, start char, end char) for every word of text."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in WORD.finditer(text)]


def guarded_texts(row: Mapping[str, str]) -> list[str]:
    """The part of a forget item the guard protects: its text, or the answer of a (prompt, answer) pair."""
    value = row.get("text") or row.get("answer")
    return [value] if value else []


@dataclass(frozen=True)
class GuardIndex:
    """Word n-grams of every pending request's forget items.

    windows[w]: the w-grams of items whose window is w; partial: every contiguous k-gram (k < its item's
    window) of an item, i.e. what a match in progress looks like (streaming holds such a suffix back).
    """

    ngram: int
    request_ids: frozenset[str] = frozenset()
    windows: Mapping[int, frozenset[Gram]] = field(default_factory=dict)
    partial: frozenset[Gram] = frozenset()

    @classmethod
    def build(cls, ngram: int, items_by_request: Mapping[str, Sequence[str]]) -> GuardIndex:
        if ngram <= 0:
            return cls(ngram)
        windows: dict[int, set[Gram]] = {}
        partial: set[Gram] = set()
        for texts in items_by_request.values():
            for text in texts:
                words = words_of(text)
                if len(words) < min(MIN_ITEM_WORDS, ngram):
                    continue
                width = min(ngram, len(words))
                windows.setdefault(width, set()).update(_grams(words, width))
                for k in range(1, width):
                    partial.update(_grams(words, k))
        frozen = {w: frozenset(grams) for w, grams in windows.items()}
        return cls(ngram, frozenset(items_by_request), frozen, frozenset(partial))

    @property
    def active(self) -> bool:
        return bool(self.windows)

    def match(self, words: Sequence[str], first_end: int = 0) -> bool:
        """Whether some item window occurs in `words`, looking at windows that end at index >= first_end."""
        for width, grams in self.windows.items():
            for end in range(max(first_end, width - 1), len(words)):
                if tuple(words[end - width + 1:end + 1]) in grams:
                    return True
        return False

    def held_suffix(self, words: Sequence[str]) -> int:
        """How many trailing words may start a match (stream them only once it is ruled out)."""
        longest = max(self.windows, default=1) - 1
        for k in range(min(longest, len(words)), 0, -1):
            if tuple(words[-k:]) in self.partial:
                return k
        return 0


def _grams(words: Sequence[str], width: int) -> Iterable[Gram]:
    return (tuple(words[i:i + width]) for i in range(len(words) - width + 1))


class OutputGuard:
    """Guard state of one generated choice: context words (end of the prompt) + the words generated so far."""

    def __init__(self, index: GuardIndex, context: str = "") -> None:
        self.index = index
        # a match may start in the prompt (an extraction prompt gives the item's first half)
        self.context = words_of(context)[-(max(index.windows, default=1) - 1):] if index.active else []
        self._checked = 0  # words of the output whose windows were checked

    def reproduces(self, text: str, final: bool = False) -> bool:
        """Whether context + text holds an item window ending inside `text` (new windows; all when final)."""
        if not self.index.active:
            return False
        words = self.context + words_of(text)
        first_end = len(self.context) if final else len(self.context) + max(self._checked - 1, 0)
        self._checked = len(words) - len(self.context)
        return self.index.match(words, first_end)

    def safe_length(self, text: str) -> int:
        """Chars of `text` that may be streamed now: not an unfinished last word, not a match in progress."""
        if not self.index.active:
            return len(text)
        spans = word_spans(text)
        if spans and spans[-1][2] == len(text):  # the last word may still grow
            safe, spans = spans[-1][1], spans[:-1]
        else:
            safe = len(text)
        held = self.index.held_suffix(self.context + [w for w, _, _ in spans])
        held_in_text = min(held, len(spans))
        if held_in_text:
            safe = min(safe, spans[-held_in_text][1])
        return safe
