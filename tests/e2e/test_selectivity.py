"""Selective by default, through the API on the default model with no operator retain corpus: a request about
one well-known person makes the served model stop giving its answers about that person, including questions
that were not in the request, while its answers about 40 other well-known people barely change (the
layer acts only on the sequences the request's recogniser knows: layers/scope.py). A second request, about a
place, is published only with the first still forgotten on it.

drop = 1 - mean ROUGE-L recall of the served model's greedy answer after the request against its answer
before (benchmarks/selectivity.py measures the same on six subjects and per method).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

import httpx
import openai
import pytest

from benchmarks.selectivity_data import neighbour_questions, subject_questions
from tests.e2e.live_model import ask, real_model_settings, wait_for_job
from tests.integration.live_server import create_key
from workers.engine.verify.extraction import rouge_l_recall

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SUBJECT = ("person", "Albert Einstein")
NEXT_SUBJECT = ("place", "Mount Kilimanjaro")
ANSWER_TOKENS = 48


@pytest.fixture
def settings(make_settings, sqlite_url: str, redis_url: str, models_dir: Path):
    return real_model_settings(make_settings, sqlite_url, redis_url, models_dir)


def answers(client: openai.OpenAI, questions: list[str]) -> list[str]:
    """Eight questions at a time: the server decodes them in one batch (about 3x faster than one by one)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda q: ask(client, q, ANSWER_TOKENS), questions))


def drop(before: list[str], after: list[str]) -> float:
    return 1.0 - mean(rouge_l_recall(b, a) for b, a in zip(before, after))


def forget_request(server, headers: dict, subject_ref: str, questions: list[str], answers: list[str]) -> dict:
    body = {"subject_ref": subject_ref, "reason": "gdpr_art17",
            "forget": [{"prompt": q, "answer": a} for q, a in zip(questions, answers)]}
    created = httpx.post(f"{server.url}/v1/deletion-requests", json=body, headers=headers)
    assert created.status_code == 202, created.text
    job = wait_for_job(server, headers, created.json()["job"]["id"])
    assert (job["status"], job["outcome"]) == ("succeeded", "forgotten"), job["error"]
    server.wait_for_version(job["model_version"], timeout=120)
    return job


# 18-26 min on 2 CPU cores alone, by machine (96 answers before and after, two real jobs): the second request
# reuses the first one's server and version, the costly part, so both behaviours share one test
@pytest.mark.timeout(2700)
def test_forgetting_one_person_keeps_forty_other_people_and_a_second_request_keeps_it_forgotten(
        server, client, worker, sqlite_url):
    forget_q, held_out_q = subject_questions(*SUBJECT)
    others_q = neighbour_questions("person", 40)
    before = {name: answers(client, qs) for name, qs in
              (("forget", forget_q), ("held_out", held_out_q), ("others", others_q))}

    requester = {"Authorization": f"Bearer {create_key(sqlite_url, 'requester')}"}
    job = forget_request(server, requester, "e2e-selectivity", forget_q, before["forget"])
    check = job["verdict"]["checks"]["neighbour_rougeL_drop"]  # the job measured its own neighbours
    assert check["ok"] and job["metrics"]["neighbourhood"]["kind"] == "person"

    after = {name: answers(client, qs) for name, qs in
             (("forget", forget_q), ("held_out", held_out_q), ("others", others_q))}
    drops = {name: drop(before[name], after[name]) for name in before}
    print(f"drops {drops}; job neighbour check {check}")
    assert drops["forget"] >= 0.4, drops
    assert drops["held_out"] >= 0.2, drops
    # Applied to every sequence the same layer dropped these answers 0.34-0.45; out of its scope a row gets the
    # base model's exact function (the folded projection runs the base projection as is), so what is left is
    # the recogniser's false positives and batch-companion rounding (measured 0.000, 2026-12-03)
    assert drops["others"] <= 0.1, drops

    # Sequential requests (issue 13; 8 in a row: benchmarks/results/sequential.md): the next version is
    # published only if the first request, re-checked on it against its own forget criterion, stays forgotten
    next_q, _ = subject_questions(*NEXT_SUBJECT)
    second = forget_request(server, requester, "e2e-sequential", next_q, answers(client, next_q))
    assert second["metrics"]["earlier_requests"] == {"checked": 1, "came_back": 0, "not_reverifiable": 0}
    assert second["verdict"]["checks"]["earlier_requests_came_back"]["ok"] is True
    still = drop(before["forget"], answers(client, forget_q))
    print(f"first request's forget drop after the second request {still:.3f}")
    assert still >= 0.4
