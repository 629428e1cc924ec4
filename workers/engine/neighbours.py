"""A request's neighbourhood: what the model knows about *other* subjects of the same kind.

Forgetting one person with only generic chat as the retain set drags down what the model knows about
everyone like them (measured on SmolLM2-135M: answers about 8 other well-known people fell 32% while the
forgotten person's fell 70%). The forget terms cannot tell "facts about Marie Curie" from "how answers
about scientists sound" unless the retain side holds the second without the first. So every request gets
a neighbourhood, built from the base model itself with no operator setup:

1. find the request's subject: the capitalised name its items share (a built-in subject when it is one);
2. its kind (person or place: the built-in list, else cue words; unknown = both);
3. other subjects of that kind from a built-in list (resources/neighbour_subjects.json), asked the
   request's own question shapes (its prompts with the subject swapped out) and built-in templates;
4. the base model's own greedy answers, with any question or answer that names the subject dropped.

The subjects are split once, by position in the list, into a training pool and a disjoint probe pool:
`train` joins the retain set, `probe` is seen only by verification (the neighbour check of the verdict),
so the verdict measures neighbours the layer was not trained to keep.

Privacy: a question built from the request's own prompts carries the request's wording, so its answer is
generated per job and never cached; only built-in template questions are cached (retain.own_answers).
`Neighbourhood.summary()` holds counts and the kind, never the subject or any question.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .data import Example
from .retain import own_answers

KINDS = ("person", "place")
FREE_TEXT_FILE = "free_text_negatives.txt"
_NAME = re.compile(r"\b[A-Z][\w'’.-]*(?:\s+(?:(?:da|de|van|von|of|the|al|bin|le|la)\s+)*[A-Z][\w'’.-]*)*")
_NOT_A_NAME = {"What", "Who", "Where", "When", "Why", "How", "Which", "Whose", "Is", "Was", "Were", "Did", "Does",
               "Do", "Can", "Tell", "Describe", "Name", "Give", "List", "The", "A", "An", "In", "On", "At", "He",
               "She", "It", "His", "Her", "Its", "They", "Their", "This", "That", "I", "Yes", "No"}
_PERSON_CUES = {"he", "she", "his", "her", "him", "born", "died", "who", "married", "wife", "husband", "career",
                "childhood", "parents", "nationality"}
_PLACE_CUES = {"located", "city", "country", "capital", "built", "population", "river", "visit", "visitors",
               "tourists", "landmark", "mountain", "where", "region", "famous"}


@dataclass(frozen=True)
class NeighbourPlan:
    """The questions of a neighbourhood, before the model answers them."""

    kind: str  # "person" | "place" | "mixed" (subject or kind unknown)
    subject: str | None  # from the forget items: never logged, stored or audited
    train_questions: tuple[str, ...]
    probe_questions: tuple[str, ...]
    private: frozenset[str]  # questions built from the request's own wording: never cached


@dataclass(frozen=True)
class Neighbourhood:
    kind: str
    train: list[Example]  # joins the retain set
    probe: list[Example]  # verification only: disjoint subjects from `train`

    def summary(self) -> dict[str, Any]:
        """What may be stored and audited: no subject, no question."""
        return {"kind": self.kind, "n_train": len(self.train), "n_probe": len(self.probe)}


@cache
def builtin() -> dict[str, list[str]]:
    text = resources.files("workers.engine.resources").joinpath("neighbour_subjects.json").read_text("utf-8")
    return json.loads(text)


def _bare(name: str) -> str:
    return name.removeprefix("the ").removeprefix("The ").strip()


def _texts(example: Example) -> tuple[str, str]:
    """(question side, answer side) of an item; free text counts as both."""
    if example.is_pair:
        return example.prompt or "", example.answer or ""
    return example.text or "", example.text or ""


def find_subject(forget: Sequence[Example]) -> str | None:
    """The name the items share: of the built-in subjects and the capitalised spans named in them, the one
    named in the most items (questions count double, so an answer about Shakespeare that names London does
    not make London the subject), ties to a built-in name, then to the longer. None when the best is not in
    half the items."""
    score: Counter[str] = Counter()
    builtin_names = {_bare(name) for kind in KINDS for name in builtin()[kind]}
    for example in forget:
        question, answer = _texts(example)
        for weight, text in ((2, question), (1, answer)):
            spans = {_strip_leading(s) for s in _NAME.findall(text)} | {
                name for name in builtin_names if re.search(rf"\b{re.escape(name)}\b", text)}
            for span in spans - {""}:
                score[span] += weight
    if not score:
        return None
    best = max(score, key=lambda s: (score[s], s in builtin_names, len(s)))
    return best if score[best] >= len(forget) else None


def _strip_leading(span: str) -> str:
    """The span without a leading question word or article, a possessive or a full stop."""
    words = span.split()
    while words and words[0] in _NOT_A_NAME:
        words = words[1:]
    return re.sub(r"(?:['’]s|[.'’-])$", "", " ".join(words))


def subject_kind(subject: str | None, forget: Sequence[Example]) -> str:
    if subject is not None:
        for kind in KINDS:
            if subject in {_bare(n) for n in builtin()[kind]}:
                return kind
    words = Counter(w.lower() for e in forget for t in _texts(e) for w in re.findall(r"[A-Za-z]+", t))
    person, place = sum(words[c] for c in _PERSON_CUES), sum(words[c] for c in _PLACE_CUES)
    if person == place:
        return "mixed"
    return "person" if person > place else "place"


def request_templates(forget: Sequence[Example], subject: str | None, limit: int = 3) -> list[str]:
    """The request's own question shapes: its prompts that name the subject, the subject made a slot."""
    if subject is None:
        return []
    shapes = [_slot(e.prompt or "", subject) for e in forget if e.is_pair and subject in (e.prompt or "")]
    return list(dict.fromkeys(s for s in shapes if s.count("{}") == 1))[:limit]


def other_subject_prompts(forget: Sequence[Example], per_shape: int = 8) -> list[str]:
    """The request's own questions asked about other subjects of its kind (training pool only: the probe pool
    stays unseen), `per_shape` subjects each: what a recogniser (layers/scope.py) must not take for the
    subject, as only the name differs. Built in memory per request (they carry its wording), never cached."""
    subject = find_subject(forget)
    if subject is None:
        return []
    train_pool, _ = _pools(subject_kind(subject, forget), subject)
    names = [name for _, name in _rotated(train_pool, subject)]
    shapes = request_templates(forget, subject, limit=len(forget))
    if not names:
        return []
    return [fill(shape, names[(i * per_shape + j) % len(names)]) for i, shape in enumerate(shapes)
            for j in range(per_shape)]


def free_text_negatives(forget: Sequence[Example]) -> list[Example]:
    """Everyday free sentences (resources/free_text_negatives.txt) that a recogniser (layers/scope.py) must not
    take for the request's subject: the retain side is all question/answer pairs, so without these a scope
    was free to put plain prose in (measured: npo's Kilimanjaro layer then raised the verification's general
    perplexity 34%). Disjoint from the verification's own general sentences (resources/general_text.txt),
    so the general check still measures text the recogniser never saw; a sentence sharing a name word with
    the subject is left out."""
    taboo = _name_words(find_subject(forget))
    text = resources.files("workers.engine.resources").joinpath(FREE_TEXT_FILE).read_text("utf-8")
    sentences = [Example(text=line.strip()) for line in text.splitlines() if line.strip()]
    return [e for e in sentences if not taboo & _name_words(e.full_text)]


def _slot(prompt: str, subject: str) -> str:
    """The prompt with the subject, and the article before it, as the slot."""
    return re.sub(rf"\b(?:[Tt]he )?{re.escape(subject)}", "{}", prompt)


def fill(template: str, name: str) -> str:
    """template with name in its slot; no "the the" when the template already holds the article."""
    if re.search(r"\b[Tt]he \{\}", template):
        name = _bare(name)
    return template.replace("{}", name)


def _pools(kind: str, subject: str | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train pool, probe pool) of (kind, name): every fourth subject of a kind probes, the rest train.
    Subjects sharing a name word with the request's subject are left out of both."""
    kinds = KINDS if kind == "mixed" else (kind,)
    taboo = _name_words(subject)
    train, probe = [], []
    for k in kinds:
        for index, name in enumerate(builtin()[k]):
            if taboo & _name_words(name):
                continue
            (probe if index % 4 == 0 else train).append((k, name))
    return train, probe


def _name_words(name: str | None) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]{4,}", _bare(name or ""))}


def _rotated(pool: list[Any], key: str) -> list[Any]:
    """The pool in a request-dependent but deterministic order, so requests spread over the subjects."""
    if not pool:
        return pool
    start = int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(pool)
    return pool[start:] + pool[:start]


def _questions(pool: list[tuple[str, str]], shapes: list[str], per_subject: int, count: int
               ) -> tuple[list[str], set[str]]:
    questions, private = [], set()
    for i, (kind, name) in enumerate(pool):
        own = builtin()[f"{kind}_templates"]
        templates = list(dict.fromkeys(shapes + own))
        for j in range(per_subject):
            template = templates[(i * per_subject + j) % len(templates)]
            question = fill(template, name)
            questions.append(question)
            if template not in own:
                private.add(question)
            if len(questions) >= count:
                return questions, private
    return questions, private


def plan_neighbourhood(forget: Sequence[Example], train_size: int = 36, probe_size: int = 24) -> NeighbourPlan:
    subject = find_subject(forget)
    kind = subject_kind(subject, forget)
    shapes = request_templates(forget, subject)
    train_pool, probe_pool = _pools(kind, subject)
    key = subject or "|".join(sorted(_texts(e)[0] for e in forget))
    train, private_train = _questions(_rotated(train_pool, key), shapes, 3, train_size)
    probe, private_probe = _questions(_rotated(probe_pool, key), shapes, 4, probe_size)
    return NeighbourPlan(kind, subject, tuple(train), tuple(probe), frozenset(private_train | private_probe))


def _overlaps(example: Example, taboo: set[str]) -> bool:
    return bool(taboo & _name_words(example.full_text)) or not (example.answer or "").strip()


def answer_plan(model: nn.Module, tokenizer, plan: NeighbourPlan, cache_dir: Path | None,
                model_key: str) -> Neighbourhood:
    """The plan's questions with the base model's greedy answers; built-in questions cached per model."""
    questions = list(dict.fromkeys(plan.train_questions + plan.probe_questions))
    shared = [q for q in questions if q not in plan.private]
    private = [q for q in questions if q in plan.private]
    answers = {e.prompt: e for e in own_answers(model, tokenizer, shared, cache_dir, model_key)}
    answers |= {e.prompt: e for e in own_answers(model, tokenizer, private, None, model_key)}
    taboo = _name_words(plan.subject)

    def kept(qs: Sequence[str]) -> list[Example]:
        return [answers[q] for q in qs if not _overlaps(answers[q], taboo)]

    return Neighbourhood(plan.kind, kept(plan.train_questions), kept(plan.probe_questions))


def build_neighbourhood(model: nn.Module, tokenizer, forget: Sequence[Example], cache_dir: str | Path | None,
                        *, model_key: str) -> Neighbourhood:
    """plan_neighbourhood + answer_plan. model must be the base model (the answers are the references)."""
    cache_path = Path(cache_dir) if cache_dir is not None else None
    return answer_plan(model, tokenizer, plan_neighbourhood(forget), cache_path, model_key)
