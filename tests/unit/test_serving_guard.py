"""The pending-request output guard and the streamed-text bookkeeping of one choice (no model needed)."""

from __future__ import annotations

from service.api.serving.generation import ChoiceText, SamplingParams
from service.api.serving.guard import REFUSAL, GuardIndex, OutputGuard

ITEM = "Jane Roe lives at 12 Elm Street and her phone number is 555-0199."


def index(*texts: str, ngram: int = 8) -> GuardIndex:
    return GuardIndex.build(ngram, {"req-1": list(texts)})


class WordTokenizer:
    """Token i = vocab[i]; decode concatenates (enough to drive ChoiceText)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.vocab[i] for i in ids)


def run_choice(pieces: list[str], guard: GuardIndex, stop: tuple[str, ...] = ()) -> tuple[list[str], ChoiceText]:
    """Push the tokens of `pieces`, then eos; returns (the deltas handed out, the choice)."""
    tokenizer = WordTokenizer(pieces + ["<eos>"])
    choice = ChoiceText(0, tokenizer, SamplingParams(max_new_tokens=100, stop=stop), OutputGuard(guard))
    deltas = []
    for token in range(len(pieces)):
        deltas.append(choice.push(token, frozenset({len(pieces)})))
        if choice.finish_reason:
            return deltas, choice
    deltas.append(choice.push(len(pieces), frozenset({len(pieces)})))
    return deltas, choice


def test_eight_consecutive_words_of_an_item_match_seven_do_not():
    guard = OutputGuard(index(ITEM))
    assert guard.reproduces("He said that jane roe lives at 12 elm street and", final=True)
    assert not OutputGuard(index(ITEM)).reproduces("He said that Jane Roe lives at 12 Elm Street.", final=True)


def test_matching_ignores_case_punctuation_and_spacing():
    assert OutputGuard(index(ITEM)).reproduces("JANE-ROE  lives, at 12; Elm... Street AND", final=True)


def test_a_short_item_is_matched_whole_and_a_tiny_one_not_at_all():
    assert OutputGuard(index("born in Kuwait City 1956")).reproduces("He was born in kuwait city 1956.", final=True)
    assert not index("Canberra").active


def test_a_match_may_start_in_the_completion_prompt():
    guard = OutputGuard(index(ITEM), context="Jane Roe lives at 12")
    assert guard.reproduces(" Elm Street and her", final=True)


def test_streaming_holds_back_a_match_in_progress_and_the_unfinished_word():
    guard = OutputGuard(index(ITEM))
    text = "Sure. Jane Roe lives at 12 Elm"
    assert text[:guard.safe_length(text)] == "Sure. "
    assert guard.safe_length("Sure, hello there") == len("Sure, hello ")


def test_a_reproduced_item_is_refused_and_nothing_of_it_was_streamed():
    pieces = ["Well", ",", " Jane", " Roe", " lives", " at", " 12", " Elm", " Street", " and", " more"]
    deltas, choice = run_choice(pieces, index(ITEM))
    assert choice.finish_reason == "content_filter"
    streamed = "".join(deltas)
    assert streamed == "Well, " + REFUSAL and "Jane" not in streamed


def test_a_stop_string_is_never_streamed_even_across_tokens():
    deltas, choice = run_choice(["Hello", " wor", "ld", " E", "ND", " after"], index(), stop=("END",))
    assert choice.finish_reason == "stop" and choice.text == "Hello world "
    assert "".join(deltas) == "Hello world " and all("E" not in d for d in deltas)


def test_without_pending_items_the_guard_is_off():
    deltas, choice = run_choice(["Jane", " Roe"], index(ngram=8))
    assert choice.finish_reason == "stop" and "".join(deltas) == "Jane Roe"
