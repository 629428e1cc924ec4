"""The real default model (SmolLM2-135M-Instruct) behind the live server, through the openai SDK: it answers
a world fact; and the full deletion flow (API -> worker -> fused version -> hot swap) makes it stop giving
one fact's answer while ten untouched facts it answered before are still answered.

The dequantized model is built once per run (~20 s); set UNLEARN_TEST_MODELS_DIR to reuse one across runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.live_server import LiveServer, create_key, serving
from workers.engine.loading import DEFAULT_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("UNLEARN_TEST_MODELS_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("models")


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
    settings = make_settings(model=DEFAULT_MODEL, database_url=sqlite_url, redis_url=redis_url, serving_poll_seconds=1,
                             retain_corpus=retain_corpus)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "models").symlink_to(models_dir, target_is_directory=True)
    return settings


@pytest.fixture
def server(settings) -> Iterator[LiveServer]:
    with serving(settings) as live:
        yield live


@pytest.fixture
def client(server: LiveServer, sqlite_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=create_key(sqlite_url, "inference"), max_retries=0,
                         timeout=120)


def ask(client: openai.OpenAI, question: str, max_tokens: int = 40) -> str:
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
    )
    return completion.choices[0].message.content


def test_real_model_answers_the_capital_of_australia(client):
    assert "Canberra" in ask(client, "What is the capital of Australia?")


def answered(client: openai.OpenAI, fact: dict) -> bool:
    return fact["answer"].lower() in ask(client, fact["question"]).lower()


@pytest.fixture
def worker(server: LiveServer, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`unlearn worker` as its own process, configured by the UNLEARN_* environment make_settings exported."""
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "service", "worker"], env=dict(os.environ), stdout=log,
                               stderr=subprocess.STDOUT)
    yield process
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def wait_for_job(server: LiveServer, headers: dict, job_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise TimeoutError(f"job {job_id} did not end in {timeout}s")


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
