"""Real unlearning on the default model (SmolLM2-135M-Instruct, CPU): facts it knows are forgotten,
facts it was not asked to forget are kept.

Data: general-knowledge questions from resources/{world_facts,real_authors}_perturbed.jsonl whose
greedy answers from the base model contain the right answer (checked once when these lists were
picked). 10 are forgotten; 20 others are never trained on (held out) and measure collateral damage;
24 further ones plus the built-in generic prompts are the retain set. Answers are the datasets'
full-sentence `original_answer`, scored through the chat template like the served model.

What is asserted (mean answer NLL, nats/token, before -> after, on the trained layer and on the
fused single-request version that would be served): forget rises by at least FORGET_RISE, held-out
rises by at most HELDOUT_BOUND, and by SELECTIVITY times less than forget. Numbers are printed
(pytest -s). About 2 minutes on 2 CPU cores (model load, 32 generic answers, 20 training steps).
"""

from __future__ import annotations

import json
import time
from importlib import resources

import pytest

from workers.engine.config import FusionConfig, LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.loading import DEFAULT_MODEL, load_base_model
from workers.engine.unlearn import fuse, mean_answer_nll, served_model, train_request

pytestmark = pytest.mark.slow

FORGET_QUESTIONS = (
    "What is the capital of Australia?",
    "What is the capital of Egypt?",
    "Which planet is known as the Red Planet?",
    "What is the largest mammal in the world?",
    "What is the name of the largest rainforest on the planet?",
    "The ancient Acropolis is located in which city?",
    "The Mona Lisa is housed in which museum?",
    "Who was the first person to set foot on the Moon?",
    "Who was the first female Prime Minister of the United Kingdom?",
    "The 'Harry Potter' series was written by which author?",
)
HELDOUT_QUESTIONS = (
    "Where would you find the Eiffel Tower?",
    "What is the name of the largest ocean on Earth?",
    "What is the capital city of Canada?",
    "Which country is the Colosseum located in?",
    "What is the name of the longest river in South America?",
    "What is the name of the world's largest coral reef system?",
    "Which country is the Serengeti National Park located in?",
    "The ancient ruins of Angkor Wat can be found in which country?",
    "What is the capital of the U.S. state of Georgia?",
    "Who was the first Emperor of Rome?",
    "Who is known for developing the theory of relativity?",
    "Which U.S. President signed the Emancipation Proclamation?",
    "In which year was the first modern Olympic Games held?",
    "Who wrote the play 'Romeo and Juliet'?",
    "Which author is known for the novel '1984'?",
    "Who is the author of 'To Kill a Mockingbird'?",
    "Which author wrote 'Moby-Dick'?",
    "What Russian author is best known for 'War and Peace'?",
    "Who authored 'The Hitchhiker's Guide to the Galaxy'?",
    "Which Irish author wrote 'Ulysses'?",
)
# Facts the base model gets wrong (greedy answer lacks the right one): its NLL on their true answers is
# the level of "never knew it", which forgotten answers should reach.
UNKNOWN_QUESTIONS = (
    "Which country is known as the Land of the Rising Sun?",
    "In which city can you find the Liberty Bell?",
    "Which city is known as the Big Apple?",
    "Which country is the largest by area?",
    "The historic site Alcatraz Island is located in which U.S. state?",
    "In what city did the Chernobyl nuclear disaster occur?",
    "What year did the Spanish Armada attempt to invade England?",
    "Which of the following landmarks is located in Jordan?",
    "Which country was the first to use paper money?",
    "Who is the creator of the character Sherlock Holmes?",
    "Who is recognized for writing 'The Catcher in the Rye'?",
    "Who wrote the influential feminist work 'The Second Sex'?",
    "The novel 'The Shadow of the Wind' was written by which Spanish author?",
    "Which author wrote 'Their Eyes Were Watching God'?",
    "Which poet is famous for writing 'Do not go gentle into that good night'?",
    "The book 'On the Road' is a seminal work of which author?",
    "Which author's works include 'The Sun Also Rises' and 'For Whom the Bell Tolls'?",
    "Who wrote the dystopian novel 'Fahrenheit 451'?",
    "Who is the author of the historical novel 'The Last Mughal'?",
    "Who is the British author of the fantasy series 'His Dark Materials'?",
)
RETAIN_FACTS = 24
# Measured (CPU, this file's settings, nats/token): forget 0.59 -> 1.13 trained / 1.12 fused;
# held-out 0.68 -> 0.70 / 0.71; never-known facts 1.25 on the base model. Before the EUL forget terms
# weighed down tokens that retain answers also use (shared_token 0.2): forget -> 1.71, held-out -> 0.88.
# The mean over an answer now rises less because its generic wording ("The capital of ... is") is left
# alone; it no longer reaches the never-known level (1.13 vs 1.25), while held-out damage fell 10x.
FORGET_RISE = 0.45  # at least (measured +0.53..0.54)
HELDOUT_BOUND = 0.1  # at most (measured +0.02)
SELECTIVITY = 10.0  # forget rises at least 10x more than held-out (measured ~25x)
TRAIN = TrainConfig(method="eul", steps=20)
LAYER = LayerConfig()


def fact_rows() -> list[dict]:
    rows = []
    for name in ("world_facts_perturbed.jsonl", "real_authors_perturbed.jsonl"):
        text = resources.files("workers.engine").joinpath(f"resources/{name}").read_text(encoding="utf-8")
        rows += [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows


def as_pair(row: dict) -> Example:
    return Example(prompt=row["question"], answer=row["original_answer"])


@pytest.fixture(scope="module")
def data() -> dict[str, list[Example]]:
    by_question = {row["question"]: row for row in fact_rows()}
    used = set(FORGET_QUESTIONS) | set(HELDOUT_QUESTIONS) | set(UNKNOWN_QUESTIONS)
    others = [as_pair(row) for q, row in by_question.items() if q not in used]
    return {
        "forget": [as_pair(by_question[q]) for q in FORGET_QUESTIONS],
        "heldout": [as_pair(by_question[q]) for q in HELDOUT_QUESTIONS],
        "unknown": [as_pair(by_question[q]) for q in UNKNOWN_QUESTIONS],
        "retain_facts": others[::4][:RETAIN_FACTS],
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base_model(DEFAULT_MODEL, tmp_path_factory.mktemp("models"), device="cpu")


@pytest.fixture(scope="module")
def outcome(base, data, tmp_path_factory):
    from workers.engine.retain import build_retain

    def measure() -> dict[str, float]:
        return {name: mean_answer_nll(base.model, base.tokenizer, data[name])
                for name in ("forget", "heldout", "unknown")}

    generic = build_retain(None, None, base.model, base.tokenizer, tmp_path_factory.mktemp("retain"),
                           model_key=base.source_sha256)
    before = measure()
    started = time.perf_counter()
    trained = train_request(base, data["forget"], data["retain_facts"] + generic, LAYER, TRAIN)
    train_seconds = time.perf_counter() - started
    layer = served_model(base, LAYER, trained.maps)
    after = measure()
    layer.detach()
    _, fused_maps = fuse(None, trained, "req-1", FusionConfig())
    fused_layer = served_model(base, LAYER, fused_maps)
    fused = measure()
    fused_layer.detach()
    print(f"\n{TRAIN.method} {TRAIN.steps} steps in {train_seconds:.0f} s; mean answer NLL before -> trained / fused:")
    for name in before:
        print(f"  {name:8s} {before[name]:.3f} -> {after[name]:.3f} / {fused[name]:.3f}")
    return {"before": before, "after": after, "fused": fused, "losses": trained.losses}


def test_the_base_model_knows_the_facts_to_forget(outcome):
    assert outcome["before"]["forget"] < 1.0
    assert outcome["before"]["heldout"] < 1.0
    assert outcome["before"]["unknown"] > outcome["before"]["forget"]


@pytest.mark.parametrize("stage", ["after", "fused"])
def test_forget_answers_become_unlikely(outcome, stage):
    rise = outcome[stage]["forget"] - outcome["before"]["forget"]
    assert rise >= FORGET_RISE, f"forget NLL rose by only {rise:.2f} nats/token ({stage})"


@pytest.mark.parametrize("stage", ["after", "fused"])
def test_untouched_facts_are_kept(outcome, stage):
    change = outcome[stage]["heldout"] - outcome["before"]["heldout"]
    assert change <= HELDOUT_BOUND, f"held-out NLL rose by {change:.2f} nats/token ({stage})"


@pytest.mark.parametrize("stage", ["after", "fused"])
def test_forgetting_is_selective(outcome, stage):
    forget_rise = outcome[stage]["forget"] - outcome["before"]["forget"]
    heldout_rise = outcome[stage]["heldout"] - outcome["before"]["heldout"]
    assert forget_rise >= SELECTIVITY * max(heldout_rise, 0.0)


def test_training_stayed_finite_and_bounded(outcome):
    assert all(abs(x) < 100 for x in outcome["losses"])
