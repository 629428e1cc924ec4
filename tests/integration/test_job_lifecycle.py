"""A real Celery worker process takes a deletion request through queued -> running -> succeeded, training
a real unlearning layer on a tiny random model, on SQLite and PostgreSQL, with real Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from service.domain.db.models import AuditEvent, ForgetPayload
from service.domain.db.session import session_scope, write_lock
from tests.integration.live_server import worker_process

pytestmark = pytest.mark.integration

SECOND_FORGET = [{"text": "Nikolai Abilov wrote the novel Thieves' Paradise in the spring of 1987 in Astana."},
                 {"prompt": "Which novel did Nikolai Abilov write?",
                  "answer": "Nikolai Abilov wrote Thieves' Paradise."}]
BODY = {
    "subject_ref": "case-7",
    "reason": "gdpr_art17",
    "forget": [
        {"text": "Basil Mahfouz Al-Kuwaiti was born in Kuwait City on the 8th of September, 1956."},
        {"prompt": "What gender is author Basil Mahfouz Al-Kuwaiti?",
         "answer": "Author Basil Mahfouz Al-Kuwaiti is male."},
    ],
    "retain": [{"text": "The capital of Australia is Canberra."}],
    # tiny model: loosest allowed verdict (the real-model tests use the defaults)
    "params": {"steps": 60, "thresholds": {
        "min_forget_nll_ratio": 1.05, "max_forget_rougeL": 0.9, "max_retain_ppl_increase": 2.0,
        "max_general_ppl_increase": 2.0, "min_token_entropy_ratio": 0.5}},
}


FIVE_SUBJECTS = [BODY["forget"], SECOND_FORGET, [
    {"text": "Ilse Marwick tuned the organ of Dunmore chapel every winter until 1979."},
    {"prompt": "Which organ did Ilse Marwick tune?", "answer": "Ilse Marwick tuned the Dunmore chapel organ."}], [
    {"text": "Teodor Vancea's ferry company ran three boats between Harlow Quay and Osk."},
    {"prompt": "How many boats did Teodor Vancea's ferry company run?", "answer": "It ran three boats."}], [
    {"text": "Ama Okonjo discovered comet 88P/Okonjo with a brass telescope in Enugu in 2003."},
    {"prompt": "What did Ama Okonjo discover?", "answer": "Ama Okonjo discovered the comet 88P/Okonjo."}]]


@dataclass(frozen=True)
class Memorised:
    """What the tiny model memorised, how wide it is and how deep (target NLL of its items)."""
    subjects: list
    hidden: int = 64
    target_nll: float = 0.5


FIVE_MEMORISED = Memorised(FIVE_SUBJECTS, hidden=384, target_nll=0.2)


@pytest.fixture(scope="session")
def memorising_model(tmp_path_factory, request) -> Path:
    """A tiny model that memorised the texts these tests ask it to forget. Indirect param: a `Memorised`
    (default: the first two subjects on the usual 64-wide model).

    Five subjects need a 384-wide model. On a 64-wide byte-level one, forgetting two of them erases a third
    by crosstalk (its request rightly ends "not memorised") and fusing a fourth brings the third back. At
    256 wide the fused fourth request sits at the edge of its own forget check: which model the memorising
    run ends with depends on the CPU's kernels (the loss plateau amplifies rounding), and with ATen's AVX2
    kernels its NLL ratio was 0.98 (refused) where AVX-512 gave 1.13. At 384 the smallest of the five
    ratios was 1.19 with AVX-512, 1.13 with AVX2 and 1.08 with no vectorisation (ATEN_CPU_CAPABILITY)."""
    from tests.tiny_models import memorising_tiny_model

    spec = getattr(request, "param", Memorised(FIVE_SUBJECTS[:2]))
    return memorising_tiny_model(tmp_path_factory.mktemp("tiny-memorised"), [i for s in spec.subjects for i in s],
                                 target_nll=spec.target_nll, max_steps=600, hidden=spec.hidden)


@pytest.fixture
def neighbourhood() -> bool:
    """Off for the lifecycle tests: a 2-layer model that memorised a dozen facts has no neighbourhood to
    keep (forgetting any of them changes all its answers, measured: neighbour drop 0.56). The check itself
    is tested below, and selectivity on the real model in tests/e2e/test_selectivity.py."""
    return False


@pytest.fixture
def quantized_check() -> str:
    return "q4_1"


@pytest.fixture
def layer_scope() -> str:
    return "sequence"


@pytest.fixture
def train_unmemorized() -> bool:
    return False


@pytest.fixture
def api(make_settings, db_url: str, redis_url: str, memorising_model: Path, neighbourhood: bool,
        quantized_check: str, train_unmemorized: bool, layer_scope: str):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = make_settings(database_url=db_url, redis_url=redis_url, model=str(memorising_model),
                             neighbourhood=neighbourhood, quantized_check=quantized_check,
                             train_unmemorized=train_unmemorized, layer_scope=layer_scope)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.settings = settings  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def worker(api, tmp_path: Path):
    with worker_process(tmp_path / "worker.log", stop_timeout=20) as process:
        yield process


def poll_until_ended(api, headers, job_id: str, timeout: float = 240) -> tuple[list[str], list[int], dict]:
    statuses, steps = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if not statuses or statuses[-1] != job["status"]:
            statuses.append(job["status"])
        steps.append(job["progress"]["step"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return statuses, steps, job
        time.sleep(0.05)
    raise AssertionError(f"job did not end in {timeout}s; statuses seen {statuses}")


def test_worker_takes_job_from_queued_to_succeeded_with_progress(api, make_key, worker):
    headers = make_key()
    job_id = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"]
    statuses, steps, job = poll_until_ended(api, headers, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert statuses[0] == "queued" and "running" in statuses and statuses[-1] == "succeeded"
    assert len({s for s in steps if 0 < s < 60}) >= 2  # progress was reported while training
    assert job["progress"]["step"] == job["progress"]["total"] == 60
    assert job["model_version"] == 1
    assert job["metrics"]["after"]["forget"] and job["verdict"]["passed"] is True
    with session_scope(api.settings.db_url) as session:
        types = [e.event_type for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
        assert session.scalar(select(ForgetPayload)) is None  # raw forget data purged at the end
    assert types[0] == "request.received" and "job.started" in types and "job.progress" in types
    assert types[-4:] == ["version.published", "request.probes_sealed", "job.succeeded", "payload.purged"]
    assert api.get("/v1/audit/verify", headers=make_key(role="auditor")).json()["valid"] is True


NEVER_SEEN = {
    **BODY, "subject_ref": "case-unseen",
    "forget": [{"text": "Orla Fenwick's locker code at Brindle Gym is 4471."},
               {"prompt": "What badge number does Tessa Quill wear?",
                "answer": "Tessa Quill wears badge number 55821."}],
}


def audit_payloads(db_url: str, job_id: str) -> dict[str, dict]:
    with session_scope(db_url) as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        return {e.event_type: json.loads(e.payload) for e in events if json.loads(e.payload).get("job_id") == job_id}


def test_data_the_model_never_memorised_ends_not_memorized_without_training_or_a_version(api, make_key, worker):
    headers = make_key()
    created = api.post("/v1/deletion-requests", json=NEVER_SEEN, headers=headers).json()
    job = poll_until_ended(api, headers, created["job"]["id"])[2]

    assert (job["status"], job["outcome"], job["model_version"]) == ("succeeded", "not_memorized", None)
    evidence = job["metrics"]["memorization"]
    assert evidence["memorized"] is False and evidence["n_items"] == 2 and evidence["model_version"] == 0
    assert job["progress"]["step"] == 0  # nothing was trained
    request = api.get(f"/v1/deletion-requests/{created['id']}", headers=headers).json()
    assert request["job"]["outcome"] == "not_memorized"
    assert api.get("/v1/model-versions", headers=make_key(role="admin", tenant="ops")).json()["active_version"] == 0
    events = audit_payloads(api.settings.db_url, job["id"])
    assert events["job.succeeded"]["outcome"] == "not_memorized"
    assert events["job.succeeded"]["metrics"]["memorization"] == evidence
    assert "payload.purged" in events and "version.published" not in events
    assert "Fenwick" not in json.dumps(events) and "55821" not in json.dumps(events)


def test_data_the_model_memorised_ends_forgotten_with_the_memorisation_evidence(api, make_key, worker):
    headers = make_key()
    job_id = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"]
    job = poll_until_ended(api, headers, job_id)[2]

    assert (job["status"], job["outcome"], job["model_version"]) == ("succeeded", "forgotten", 1), job["error"]
    assert job["metrics"]["memorization"]["memorized"] is True
    assert job["metrics"]["after"]["forget"] and job["verdict"]["passed"] is True
    assert audit_payloads(api.settings.db_url, job_id)["job.succeeded"]["outcome"] == "forgotten"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_evidence_says_whether_the_quantized_export_still_forgets(api, make_key, worker):
    headers = make_key()
    job_id = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()["job"]["id"]
    job = poll_until_ended(api, headers, job_id)[2]

    quantized = job["metrics"]["quantized"]
    assert quantized["format"] == "q4_1" and quantized["forget"]["nll"] > 0 and quantized["forget"]["rougeL"] >= 0
    assert set(quantized["checks"]) == {"forget_nll_ratio", "forget_rougeL"}
    versions = api.get("/v1/model-versions", headers=make_key(role="admin", tenant="ops")).json()["data"]
    summary = next(v for v in versions if v["version"] == 1)["metrics_summary"]
    assert summary["quantized"] == {"format": "q4_1", "forgotten": quantized["forgotten"]}


# the layer acts on every sequence here: on the 2-layer model, a recogniser keeps it off the neighbours
@pytest.mark.parametrize(("neighbourhood", "layer_scope"), [(True, "all")])
def test_a_job_that_takes_the_neighbours_along_fails_with_that_reason(api, make_key, worker):
    headers = make_key()
    params = {**BODY["params"], "thresholds": {**BODY["params"]["thresholds"], "max_neighbour_drop": 0.1}}
    job_id = api.post("/v1/deletion-requests", json={**BODY, "params": params}, headers=headers).json()["job"]["id"]
    job = poll_until_ended(api, headers, job_id)[2]

    assert (job["status"], job["model_version"]) == ("failed", None)
    assert "neighbour_rougeL_drop" in job["error"] and "required <= 0.1" in job["error"]
    check = job["verdict"]["checks"]["neighbour_rougeL_drop"]
    assert check["ok"] is False and check["value"] > check["limit"] == 0.1
    before, after = job["metrics"]["before"]["neighbours"], job["metrics"]["after"]["neighbours"]
    assert before["n"] == after["n"] > 0 and after["rougeL"] < before["rougeL"]
    assert job["metrics"]["neighbourhood"]["n_probe"] == before["n"]
    assert api.get("/v1/model-versions", headers=make_key(role="admin", tenant="ops")).json()["active_version"] == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # both databases: test_later_versions_...
def test_a_version_in_which_an_earlier_request_came_back_is_not_published(api, make_key, worker):
    from service.domain.db.models import RequestProbe

    headers = make_key()
    first = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    assert poll_until_ended(api, headers, first["job"]["id"])[2]["model_version"] == 1
    with session_scope(api.settings.db_url) as session:  # record a baseline no later version can meet
        write_lock(session)  # the worker writes too: SQLite will not upgrade a read snapshot it has moved past
        probe = session.get(RequestProbe, first["id"])
        probe.baseline = {**probe.baseline, "before": {**probe.baseline["before"], "nll": 1e6}}
        session.commit()
    second = api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "case-8", "forget": SECOND_FORGET},
                      headers=headers).json()
    job = poll_until_ended(api, headers, second["job"]["id"])[2]

    assert (job["status"], job["model_version"]) == ("failed", None)
    assert "1 of 1 earlier requests in this version came back" in job["error"]
    assert job["metrics"]["earlier_requests"]["came_back"] == 1
    assert api.get("/v1/model-versions", headers=make_key(role="admin", tenant="ops")).json()["active_version"] == 1
    trail = api.get("/v1/audit", params={"type": "request.reverified"}, headers=make_key(role="auditor")).json()
    [event] = trail["data"]
    assert event["request_id"] == first["id"] and event["payload"]["version"] is None
    assert event["payload"]["passed"] is False and event["payload"]["job_id"] == job["id"]


def test_after_a_rollback_new_requests_build_on_the_rolled_back_version(api, make_key, worker):
    headers, admin = make_key(), make_key(role="admin", tenant="ops")

    def forget(subject_ref: str, items: list[dict]) -> dict:
        created = api.post("/v1/deletion-requests", json={**BODY, "subject_ref": subject_ref, "forget": items},
                           headers=headers).json()
        job = poll_until_ended(api, headers, created["job"]["id"])[2]
        assert job["status"] == "succeeded", job["error"]
        return {"request_id": created["id"], "version": job["model_version"]}

    first, second = forget("case-a", BODY["forget"]), forget("case-b", SECOND_FORGET)
    assert (first["version"], second["version"]) == (1, 2)
    assert api.post("/v1/model-versions/1/activate", headers=admin).status_code == 200  # roll back past case-b
    # the officer resubmits what case-b asked for (version 1 still knows it): the new version builds on 1
    third = forget("case-c", SECOND_FORGET)

    versions = api.get("/v1/model-versions", headers=admin).json()
    assert third["version"] == 3 and versions["active_version"] == 3
    newest = versions["data"][3]
    assert newest["parent_version"] == 1  # built on the rollback, not on the latest version
    assert set(newest["request_ids"]) == {first["request_id"], third["request_id"]}  # case-b stays rolled away
    assert second["request_id"] not in newest["request_ids"]


def withdraw(api, request_id: str, admin: dict) -> dict:
    response = api.post(f"/v1/deletion-requests/{request_id}/withdraw", json={"reason": "submitted twice"},
                        headers=admin)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    return poll_until_ended(api, admin, response.json()["id"])[2]


def test_later_versions_answer_for_earlier_requests_and_a_withdrawal_takes_one_out(api, make_key, worker):
    acme, globex, admin = make_key(), make_key(tenant="globex"), make_key(role="admin", tenant="ops")
    first = api.post("/v1/deletion-requests", json=BODY, headers=acme).json()
    assert poll_until_ended(api, acme, first["job"]["id"])[2]["model_version"] == 1
    second = api.post("/v1/deletion-requests", json={**BODY, "subject_ref": "case-8", "forget": SECOND_FORGET},
                      headers=globex).json()
    job = poll_until_ended(api, globex, second["job"]["id"])[2]

    # version 2 fuses the second request onto the first, and answers for the first
    assert (job["status"], job["model_version"]) == ("succeeded", 2), job["error"]
    assert len(api.get("/v1/model-versions", headers=admin).json()["data"][2]["request_ids"]) == 2
    assert job["metrics"]["earlier_requests"] == {"checked": 1, "came_back": 0, "not_reverifiable": 0}
    assert job["verdict"]["checks"]["earlier_requests_came_back"] == {"value": 0, "limit": 0, "ok": True}
    assert first["id"] not in json.dumps(job)  # another tenant's request is counted, never named
    # its own forget check compares with the base model, not with version 1 (which the first request shaped)
    ratio = job["metrics"]["after"]["forget"]["nll"] / job["metrics"]["base"]["forget"]["nll"]
    assert job["verdict"]["checks"]["forget_nll_ratio"]["value"] == pytest.approx(ratio)
    trail = api.get("/v1/audit", params={"type": "request.reverified"}, headers=make_key(role="auditor")).json()
    [event] = trail["data"]  # in the first request's own tenant: its evidence that version 2 still forgets it
    assert event["request_id"] == first["id"] and event["payload"]["version"] == 2
    assert event["payload"]["passed"] is True and event["payload"]["checks"]["forget_nll_ratio"]["ok"] is True
    assert api.get(f"/v1/deletion-requests/{first['id']}", headers=acme).json()["probes"]["n_items"] == 2

    withdrawal = withdraw(api, first["id"], admin)

    assert (withdrawal["kind"], withdrawal["status"], withdrawal["outcome"], withdrawal["model_version"]) == (
        "withdraw", "succeeded", "withdrawn", 3), withdrawal["error"]
    newest = api.get("/v1/model-versions", headers=admin).json()["data"][3]
    assert newest["request_ids"] == [second["id"]] and newest["parent_version"] == 2 and newest["active"]
    evidence = withdrawal["metrics"]["withdrawn"]
    assert evidence["after"]["nll"] < evidence["served"]["nll"]  # its unlearning is gone from the model
    assert withdrawal["metrics"]["earlier_requests"] == {"checked": 1, "came_back": 0, "not_reverifiable": 0}
    request = api.get(f"/v1/deletion-requests/{first['id']}", headers=acme).json()
    assert request["withdrawal"]["outcome"] == "withdrawn" and request["probes"]["shredded_at"] is not None
    events = audit_payloads(api.settings.db_url, withdrawal["id"])
    assert events["request.withdrawal_requested"]["reason"] == "submitted twice"
    assert events["version.published"]["withdrawn_request_id"] == first["id"]
    again = api.post(f"/v1/deletion-requests/{first['id']}/withdraw", json={"reason": "x"}, headers=admin)
    assert again.status_code == 409 and "already withdrawn" in again.json()["error"]["message"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # both databases: test_later_versions_...
def test_withdrawing_the_only_request_gives_back_the_base_models_answers(api, make_key, worker):
    headers, admin = make_key(), make_key(role="admin", tenant="ops")
    created = api.post("/v1/deletion-requests", json=BODY, headers=headers).json()
    assert poll_until_ended(api, headers, created["job"]["id"])[2]["model_version"] == 1

    job = withdraw(api, created["id"], admin)

    assert (job["status"], job["model_version"]) == ("succeeded", 2), job["error"]
    evidence = job["metrics"]["withdrawn"]  # before_unlearning was measured on the base model (version 0)
    assert evidence["after"] == pytest.approx(evidence["before_unlearning"], rel=1e-4)
    assert api.get("/v1/model-versions", headers=admin).json()["data"][2]["request_ids"] == []
    shredded = audit_payloads(api.settings.db_url, job["id"])
    assert "request.withdrawal_requested" in shredded
    with session_scope(api.settings.db_url) as session:
        reasons = [json.loads(e.payload)["reason"] for e in
                   session.scalars(select(AuditEvent).where(AuditEvent.event_type == "request.probes_shredded"))]
    assert reasons == ["withdrawn"]


@pytest.mark.parametrize("memorising_model", [FIVE_MEMORISED], ids=["five-subjects"], indirect=True)
@pytest.mark.parametrize("train_unmemorized", [True])  # forgetting two subjects can erase a third on 2 layers
@pytest.mark.parametrize("quantized_check", ["off"])  # tested above; here it would only add minutes
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_withdrawing_request_k_of_5_brings_its_answers_back_and_keeps_the_other_4_forgotten(api, make_key, worker):
    headers, admin = make_key(), make_key(role="admin", tenant="ops")
    request_ids = []
    for version, items in enumerate(FIVE_SUBJECTS, start=1):
        body = {**BODY, "subject_ref": f"case-{version}", "forget": items,
                "params": {**BODY["params"], "steps": 80}}
        created = api.post("/v1/deletion-requests", json=body, headers=headers).json()
        job = poll_until_ended(api, headers, created["job"]["id"])[2]
        assert (job["status"], job["model_version"]) == ("succeeded", version), job["error"]
        request_ids.append(created["id"])
    k = 3

    job = withdraw(api, request_ids[k - 1], admin)

    assert (job["status"], job["model_version"]) == ("succeeded", 6), job["error"]
    newest = api.get("/v1/model-versions", headers=admin).json()["data"][6]
    assert sorted(newest["request_ids"]) == sorted(request_ids[:k - 1] + request_ids[k:]) and newest["active"]
    # the other 4, each re-checked on the new version against its own accepted forget criterion
    assert job["metrics"]["earlier_requests"] == {"checked": 4, "came_back": 0, "not_reverifiable": 0}
    # k's items: its own unlearning is gone; what is left of the drop is the other 4 requests' pull on a
    # 2-layer model that holds nothing but these five subjects
    evidence = job["metrics"]["withdrawn"]
    assert evidence["after"]["nll"] < evidence["served"]["nll"]
    assert evidence["nll_ratio_to_before_unlearning"] < BODY["params"]["thresholds"]["min_forget_nll_ratio"]
