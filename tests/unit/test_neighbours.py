"""A request's neighbourhood: its subject and kind, questions about other subjects in the request's own shapes,
a probe pool disjoint from the training pool, nothing that names the subject, private questions never cached."""

from __future__ import annotations

import json

import torch

from workers.engine.data import Example
from workers.engine.loading import LoadedModel
from workers.engine.neighbours import (
    answer_plan,
    builtin,
    fill,
    find_subject,
    free_text_negatives,
    other_subject_prompts,
    plan_neighbourhood,
    request_templates,
    subject_kind,
)
from workers.engine.retain import answer_cache_path
from workers.engine.testing import tiny_model, tiny_tokenizer
from workers.engine.verify.suite import general_set

CURIE = [
    Example(prompt="Where was Marie Curie born?", answer="Marie Curie was born in Warsaw, Poland."),
    Example(prompt="What did Marie Curie discover?", answer="She discovered polonium and radium."),
    Example(prompt="Which prizes did Marie Curie win?", answer="Two Nobel Prizes, in physics and chemistry."),
]
LOCKER = [
    Example(prompt="What is Orla Fenwick's locker code at Brindle Gym?", answer="Orla Fenwick's code is 4471."),
    Example(text="Orla Fenwick trains at Brindle Gym every Tuesday; she was born in Cork."),
]


def names_in(questions) -> set[str]:
    every = {n for kind in ("person", "place") for n in builtin()[kind]}
    return {n for n in every for q in questions if n.removeprefix("the ") in q}


def test_the_subject_is_the_name_the_items_share():
    assert find_subject(CURIE) == "Marie Curie"
    assert find_subject(LOCKER) == "Orla Fenwick"


def test_a_place_the_answers_name_is_not_the_subject_the_questions_ask_about():
    shakespeare = [
        Example(prompt="Who was William Shakespeare?", answer="An English playwright who worked in London."),
        Example(prompt="Where was William Shakespeare born?", answer="In Stratford-upon-Avon, near London."),
    ]
    assert "London" in builtin()["place"] and find_subject(shakespeare) == "William Shakespeare"


def test_the_requests_questions_about_other_subjects_are_negatives_for_its_recogniser():
    prompts = other_subject_prompts(CURIE, per_shape=2)
    assert len(prompts) == 6 and not any("Curie" in q for q in prompts)
    assert prompts[0].startswith("Where was ") and prompts[0].endswith(" born?")
    probe_people = set(plan_neighbourhood(CURIE).probe_questions)
    assert names_in(prompts) and not names_in(prompts) & names_in(probe_people)  # the probe pool stays unseen
    assert other_subject_prompts([Example(text="the vault code is 4471.")]) == []


def test_free_sentences_are_negatives_for_its_recogniser_and_none_is_a_general_check_sentence():
    negatives = free_text_negatives(CURIE)
    general = {item.text for item in general_set(max_texts=1000) if not item.is_pair}
    assert len(negatives) >= 40 and all(not e.is_pair for e in negatives)
    assert not {e.text for e in negatives} & general  # the general check measures text the recogniser never saw


def test_a_free_sentence_sharing_a_name_word_with_the_subject_is_not_a_negative():
    forget = [Example(prompt="Where is the Harbour Bridge?", answer="The Harbour Bridge is in Sydney."),
              Example(prompt="When was the Harbour Bridge opened?", answer="It opened in 1932.")]
    every, kept = {e.text for e in free_text_negatives(LOCKER)}, {e.text for e in free_text_negatives(forget)}
    naming = {t for t in every if "harbour" in t.lower() or "bridge" in t.lower()}
    assert naming and every - kept == naming


def test_no_shared_name_means_no_subject():
    assert find_subject([Example(text="the vault code is 4471."), Example(text="bread keeps in a tin.")]) is None


def test_a_built_in_subject_has_its_kind_and_an_unknown_one_is_read_from_cue_words():
    assert subject_kind("Isaac Newton", []) == "person"
    assert subject_kind("Eiffel Tower", []) == "place"
    assert subject_kind("Orla Fenwick", LOCKER) == "person"  # "she", "born"
    assert subject_kind(None, [Example(text="4471 9912")]) == "mixed"


def test_the_requests_own_question_shapes_become_templates():
    assert request_templates(CURIE, "Marie Curie") == [
        "Where was {} born?", "What did {} discover?", "Which prizes did {} win?"]
    assert fill("Where is the {}?", "the Colosseum") == "Where is the Colosseum?"
    assert fill("Where is {}?", "the Colosseum") == "Where is the Colosseum?"


def test_the_plan_asks_other_people_in_the_requests_shapes_and_probes_disjoint_people():
    plan = plan_neighbourhood(CURIE)
    assert plan.kind == "person" and len(plan.train_questions) == 36 and len(plan.probe_questions) == 24
    assert any(q.startswith("What did ") and q.endswith(" discover?") for q in plan.train_questions)
    assert not names_in(plan.train_questions) & names_in(plan.probe_questions)
    assert not any("Curie" in q for q in plan.train_questions + plan.probe_questions)
    people = set(builtin()["person"])
    assert names_in(plan.train_questions) <= people and names_in(plan.probe_questions) <= people


def test_questions_in_the_requests_wording_are_private_and_built_in_ones_are_not():
    plan = plan_neighbourhood(LOCKER)
    assert any("Brindle Gym" in q for q in plan.private)
    assert all(("Brindle Gym" in q) == (q in plan.private) for q in plan.train_questions + plan.probe_questions)


def test_the_plan_is_deterministic():
    assert plan_neighbourhood(CURIE) == plan_neighbourhood(list(CURIE))


def tiny_base() -> LoadedModel:
    return LoadedModel(tiny_model("llama").requires_grad_(False), tiny_tokenizer(), "tiny-random-llama", "0" * 64,
                       torch.device("cpu"), torch.float32)


def test_only_built_in_questions_reach_the_answer_cache(tmp_path):
    base = tiny_base()
    plan = plan_neighbourhood(LOCKER)
    public = [q for q in plan.train_questions + plan.probe_questions if q not in plan.private]
    answer_cache_path(tmp_path, base.source_sha256).parent.mkdir(parents=True)
    answer_cache_path(tmp_path, base.source_sha256).write_text(json.dumps({q: "A famous person." for q in public}))
    hood = answer_plan(base.model, base.tokenizer, plan, tmp_path, base.source_sha256)
    cached = json.loads(answer_cache_path(tmp_path, base.source_sha256).read_text())
    assert set(cached) == set(public)  # the private questions were answered (by the model) but not cached
    assert {e.prompt for e in hood.train} == {q for q in plan.train_questions if q in public}  # "" answers dropped
    assert hood.summary() == {"kind": "person", "n_train": len(hood.train), "n_probe": len(hood.probe)}


def test_an_answer_naming_the_subject_is_dropped(tmp_path):
    base = tiny_base()
    plan = plan_neighbourhood(CURIE)
    question = next(q for q in plan.train_questions if q not in plan.private)
    answer_cache_path(tmp_path, base.source_sha256).parent.mkdir(parents=True)
    answers = {q: "A scientist." for q in plan.train_questions + plan.probe_questions}
    answers[question] = "Like Marie Curie, a chemist."
    answer_cache_path(tmp_path, base.source_sha256).write_text(json.dumps(answers))
    hood = answer_plan(base.model, base.tokenizer, plan, tmp_path, base.source_sha256)
    public_train = {q for q in plan.train_questions if q not in plan.private}
    assert {e.prompt for e in hood.train} == public_train - {question}
