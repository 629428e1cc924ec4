"""The real default model (SmolLM2-135M-Instruct) behind the live server, through the openai SDK: it answers
a world fact; and the full deletion flow (API -> worker -> fused version -> hot swap) makes it stop giving
one fact's answer while ten untouched facts it answered before are still answered.

The dequantized model is built once per run (~20 s, tests/e2e/conftest.py); set UNLEARN_TEST_MODELS_DIR to
reuse one across runs.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.live_model import ask, real_model_settings, wait_for_job
from tests.integration.live_server import create_key

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def world_facts() -> list[dict]:
    text = resources.files("workers.engine").joinpath("resources/world_facts_perturbed.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def retain_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator retain corpus the README recommends: 24 questions of the forget item's kind, which the
    service answers with the base model's own words, from the end of the file (the facts the test checks
    come from its start), none in the verification's general set. Without one, measured: 4 of the 10
    checked facts were lost."""
    from workers.engine.verify.suite import general_set

    held_out = {item.prompt for item in general_set()}
    rows = [{"question": f["question"]} for f in world_facts()[-40:] if f["question"] not in held_out][-24:]
    path = tmp_path_factory.mktemp("retain") / "retain.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def settings(make_settings, sqlite_url: str, redis_url: str, models_dir: Path, retain_corpus: Path):
    # The operator-corpus configuration this test has pinned since issue 3 (corpus only, no neighbourhood).
    # With the neighbourhood on as well, measured once: 9 of 10 kept (the Golden Gate Bridge answer, one of the
    # fragile ones, was lost); the neighbourhood path is tested in test_selectivity.py.
    return real_model_settings(make_settings, sqlite_url, redis_url, models_dir, retain_corpus=retain_corpus,
                               neighbourhood=False)


def test_real_model_answers_the_capital_of_australia(client):
    assert "Canberra" in ask(client, "What is the capital of Australia?")


def answered(client: openai.OpenAI, fact: dict) -> bool:
    return fact["answer"].lower() in ask(client, fact["question"]).lower()


@pytest.mark.skipif(importlib.util.find_spec("workers.engine.unlearn") is None,
                    reason="the worker pipeline (workers.engine.unlearn) is not there yet")
def test_deletion_request_removes_one_fact_and_keeps_ten_others(server, client, worker, sqlite_url, retain_corpus):
    known = []
    for fact in world_facts():
        if answered(client, fact):
            known.append(fact)
        if len(known) == 11:
            break
    assert len(known) == 11, "the base model should answer at least 11 of the built-in world facts"
    target, untouched = known[0], known[1:]
    trained_to_keep = {json.loads(line)["question"] for line in retain_corpus.read_text().splitlines()}
    assert not trained_to_keep & {fact["question"] for fact in known}  # the checked facts are never trained on

    requester = {"Authorization": f"Bearer {create_key(sqlite_url, 'requester')}"}
    # the answer as the model itself phrases it: forgetting the one word "Paris" as a whole answer
    # (already unlikely, 9.7 nats) would not stop "The Eiffel Tower is located in Paris"
    body = {"subject_ref": "e2e-world-fact", "reason": "other",
            "forget": [{"prompt": target["question"], "answer": target["original_answer"]}]}
    created = httpx.post(f"{server.url}/v1/deletion-requests", json=body, headers=requester)
    assert created.status_code == 202, created.text
    job = wait_for_job(server, requester, created.json()["job"]["id"])
    assert job["status"] == "succeeded", job["error"]
    assert_full_before_after_set(job)
    assert job["metrics"]["after"]["forget"]["nll"] > job["metrics"]["before"]["forget"]["nll"]
    assert job["verdict"]["passed"] is True and job["verdict"]["reasons"] == []
    server.wait_for_version(job["model_version"], timeout=120)

    assert not answered(client, target)
    still = [fact["question"] for fact in untouched if answered(client, fact)]
    lost = [fact["question"] for fact in untouched if fact["question"] not in still]
    print(f"kept {len(still)} of {len(untouched)} untouched facts; lost {lost}")
    # measured on 2 CPU cores: 10 of 10 kept; 9 of 10 before the EUL forget terms down-weighted answer
    # tokens that retain answers also use ("The ... is located in"), 6 of 10 without a retain corpus
    assert still == [fact["question"] for fact in untouched], f"lost: {lost}"


def assert_full_before_after_set(job: dict) -> None:
    """Every section measured on both sides, from the model's outputs (DESIGN section 6)."""
    for side in ("before", "after"):
        metrics = job["metrics"][side]
        assert {"nll", "prob", "rougeL", "answer_rougeL"} <= set(metrics["forget"]), metrics["forget"]
        assert {"nll", "ppl", "rougeL", "token_entropy", "truth_ratio", "kl_to_base"} <= set(metrics["general"])
        assert {"auc_min_k", "auc_min_k_pp", "privleak_min_k"} <= set(metrics["mia"]), metrics["mia"]


def test_a_one_step_request_fails_its_verdict_and_is_never_served(server, worker, sqlite_url):
    fact = world_facts()[0]
    requester = {"Authorization": f"Bearer {create_key(sqlite_url, 'requester')}"}
    body = {"subject_ref": "e2e-weak", "reason": "other", "params": {"steps": 1},
            "forget": [{"prompt": fact["question"], "answer": fact["original_answer"]}]}
    created = httpx.post(f"{server.url}/v1/deletion-requests", json=body, headers=requester)
    assert created.status_code == 202, created.text
    job = wait_for_job(server, requester, created.json()["job"]["id"])
    assert job["status"] == "failed" and job["model_version"] is None
    assert_full_before_after_set(job)
    assert job["verdict"]["passed"] is False
    # one step moves the answer's likelihood but greedy decoding still reproduces it
    failed_checks = [name for name, check in job["verdict"]["checks"].items() if not check["ok"]]
    assert set(failed_checks) & {"forget_nll_ratio", "forget_rougeL"}, job["verdict"]
    admin = {"Authorization": f"Bearer {create_key(sqlite_url, 'admin', 'ops')}"}
    versions = httpx.get(f"{server.url}/v1/model-versions", headers=admin).json()
    assert versions["active_version"] == 0 and [v["version"] for v in versions["data"]] == [0]
    assert server.holder.current().version == 0
