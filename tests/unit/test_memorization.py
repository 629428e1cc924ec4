"""The memorisation check that decides a job's outcome: items a model reproduces or finds far likelier than
its own answers are memorised; text it never saw is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import memorising_tiny_model
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.memorization import MemorizationConfig, memorization_report, new_words
from workers.engine.verify.scoring import to_eval_items

KNOWN = [
    {"text": "Basil Mahfouz Al-Kuwaiti was born in Kuwait City on the 8th of September, 1956."},
    {"prompt": "Where does Nikolai Abilov write?", "answer": "Nikolai Abilov writes in Astana."},
]
UNSEEN = [
    {"text": "Orla Fenwick's locker code at Brindle Gym is 4471."},
    {"prompt": "What badge number does Tessa Quill wear?", "answer": "Tessa Quill wears badge number 55821."},
]


@pytest.fixture(scope="module")
def memorising(tmp_path_factory: pytest.TempPathFactory):
    path: Path = memorising_tiny_model(tmp_path_factory.mktemp("memorised"), KNOWN)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_items_the_model_memorised_are_reported_memorised(memorising):
    report = memorization_report(*memorising, to_eval_items(KNOWN))
    assert report["memorized"] is True and report["n_memorized"] == 2
    for item in report["items"]:
        assert item["truth_ratio"] < MemorizationConfig().max_truth_ratio  # far likelier than its own answers


def test_text_the_model_never_saw_is_not_memorised(memorising):
    report = memorization_report(*memorising, to_eval_items(UNSEEN))
    assert report["memorized"] is False and report["n_memorized"] == 0
    assert all(item["reproduction"] < 0.5 for item in report["items"])


def test_a_random_model_has_memorised_nothing():
    report = memorization_report(tiny_model("llama").eval(), tiny_tokenizer(), to_eval_items(KNOWN + UNSEEN))
    assert report["memorized"] is False


def test_the_report_holds_numbers_never_the_text(memorising):
    report = memorization_report(*memorising, to_eval_items(KNOWN))
    flat = repr(report)
    assert "Kuwait" not in flat and "Astana" not in flat
    assert set(report["items"][0]) == {"reproduction", "truth_ratio", "target_nll", "reference_nll",
                                       "samples_reproducing", "memorized"}


def test_the_same_inputs_give_the_same_report(memorising):
    items = to_eval_items(KNOWN + UNSEEN)
    assert memorization_report(*memorising, items) == memorization_report(*memorising, items)


def test_an_answer_that_restates_its_question_counts_only_its_new_words():
    assert new_words("Orla Fenwick's locker code is 4471.", "What is Orla Fenwick's locker code?") == "4471"
    assert new_words("It is.", "What is it?") == ""
