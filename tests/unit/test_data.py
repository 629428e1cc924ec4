"""Parsing forget/retain rows and the operator retain corpus (workers.engine.data)."""

from __future__ import annotations

import pytest

from workers.engine.data import Example, parse_example, read_corpus


def test_a_tofu_question_row_is_a_prompt_answer_pair():
    assert parse_example({"question": "Q", "answer": "A"}) == Example(prompt="Q", answer="A")


def test_a_row_with_neither_text_nor_answer_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"\['answer_text'\]"):
        parse_example({"answer_text": "A"})


def test_corpus_splits_given_examples_from_bare_prompts(tmp_path):
    corpus = tmp_path / "retain.jsonl"
    corpus.write_text('{"question": "Q1", "answer": "A1"}\n\n{"text": "T2"}\n{"prompt": "P3"}\n{"question": "Q4"}\n')
    given, prompts = read_corpus(corpus)
    assert given == [Example(prompt="Q1", answer="A1"), Example(text="T2")]
    assert prompts == ["P3", "Q4"]


@pytest.mark.parametrize(("content", "line"), [('{"text": "ok"}\nnot json\n', 2), ('{"answer": "A"}\n', 1),
                                               ('{"text": "ok"}\n\n["Q", "A"]\n', 3), ('{"prompt": 7}\n', 1)])
def test_a_bad_corpus_row_is_refused_naming_its_line(tmp_path, content, line):
    corpus = tmp_path / "retain.jsonl"
    corpus.write_text(content)
    with pytest.raises(ValueError, match=f"line {line}: "):
        read_corpus(corpus)
