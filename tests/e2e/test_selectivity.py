"""Selective by default, through the API on the default model with no operator retain corpus: a request about
one well-known person makes the served model stop giving its answers about that person, including questions
that were not in the request, while its answers about 40 other well-known people change far less (not yet
as little as the product aims at: see the bound's comment).

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


@pytest.mark.timeout(2700)  # 15-22 min on 2 CPU cores alone, by machine (96 answers before and after, one real job)
def test_forgetting_one_person_keeps_forty_other_people(server, client, worker, sqlite_url):
    forget_q, held_out_q = subject_questions(*SUBJECT)
    others_q = neighbour_questions("person", 40)
    before = {name: answers(client, qs) for name, qs in
              (("forget", forget_q), ("held_out", held_out_q), ("others", others_q))}

    requester = {"Authorization": f"Bearer {create_key(sqlite_url, 'requester')}"}
    body = {"subject_ref": "e2e-selectivity", "reason": "gdpr_art17",
            "forget": [{"prompt": q, "answer": a} for q, a in zip(forget_q, before["forget"])]}
    created = httpx.post(f"{server.url}/v1/deletion-requests", json=body, headers=requester)
    assert created.status_code == 202, created.text
    job = wait_for_job(server, requester, created.json()["job"]["id"])
    assert (job["status"], job["outcome"]) == ("succeeded", "forgotten"), job["error"]
    check = job["verdict"]["checks"]["neighbour_rougeL_drop"]  # the job measured its own neighbours
    assert check["ok"] and job["metrics"]["neighbourhood"]["kind"] == "person"
    server.wait_for_version(job["model_version"], timeout=120)

    after = {name: answers(client, qs) for name, qs in
             (("forget", forget_q), ("held_out", held_out_q), ("others", others_q))}
    drops = {name: drop(before[name], after[name]) for name in before}
    print(f"drops {drops}; job neighbour check {check}")
    assert drops["forget"] >= 0.4, drops
    assert drops["held_out"] >= 0.2, drops
    # Not yet the product's goal (<= 0.1, issue 12). Measured on this subject through the engine: 0.77 with the
    # old generic-only retain set, 0.34-0.43 with the neighbourhood (it varies between runs with the base
    # model's batch-dependent answers); through the API the untrimmed answers drop more (CI run: above 0.45).
    # A layer trained with no forget terms at all already drifts 0.12. This bound guards the neighbourhood's gain.
    assert drops["others"] <= 0.6, drops
