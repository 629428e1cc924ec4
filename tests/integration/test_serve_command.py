"""The README's first command on a fresh data dir: `unlearn serve` alone (no UNLEARN_REDIS_URL, no database
URL) starts the embedded Redis, migrates SQLite, serves the API and runs a worker, and a deletion request
submitted with a key from `unlearn keys create` is trained, fused and published by that worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
    env.update(UNLEARN_DATA_DIR=str(tmp_path / "data"), UNLEARN_MODEL=str(model), UNLEARN_DEVICE="cpu")
    return env


@pytest.fixture
def served(fresh_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)], env=fresh_env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=120)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        print((tmp_path / "serve.log").read_text(errors="replace")[-4000:])


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
    created = httpx.post(f"{served}/v1/deletion-requests", json=BODY, headers={**headers, "Idempotency-Key": "case-1042"})
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
