"""A real uvicorn server on a free loopback port, in a thread of the test process, serving the real app
(serve_model=True): the openai SDK talks to it over HTTP, and a test can still reach app.state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import uvicorn

from service.api.app import create_app
from service.domain.broker import EmbeddedRedis
from service.domain.db.session import session_scope
from service.domain.repositories import api_keys
from service.domain.settings import Settings
from tests.conftest import IN_CI, REDIS_TEST_URL, missing_service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def holder(self):
        return self.app.state.serving

    def start(self, timeout: float = 120.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started and httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited at start")
            time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout}s: {self.holder.last_error if self.holder else ''}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_for_version(self, version: int, timeout: float = 30.0) -> None:
        """Until this process serves `version` (the holder notices on a Redis hint or its db poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            served = self.holder.current()
            if served is not None and served.version == version:
                return
            time.sleep(0.02)
        raise TimeoutError(f"version {version} not served after {timeout}s: {self.holder.last_error}")


def create_key(db_url: str, role: str, tenant: str = "acme") -> str:
    with session_scope(db_url) as session:
        _key, plaintext = api_keys.create_key(session, role, tenant)
        session.commit()
    return plaintext


@contextmanager
def serving(settings: Settings) -> Iterator[LiveServer]:
    """The app with serve_model=True behind a live server, stopped afterwards."""
    server = LiveServer(create_app(settings, serve_model=True)).start()
    try:
        yield server
    finally:
        server.stop()


def redis_url_for_module(data_dir: Path) -> Iterator[str]:
    """Like conftest's redis_url, for module-scoped servers: the machine's Redis, else an embedded one."""
    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_timeout=2, socket_connect_timeout=2).ping()
        yield REDIS_TEST_URL
        return
    except redis.exceptions.RedisError as exc:
        if IN_CI:
            missing_service("Redis on 127.0.0.1:6379", exc)
    embedded = EmbeddedRedis(data_dir / "redis-data")
    yield embedded.start()
    embedded.stop()


@contextmanager
def worker_process(log_path: Path, stop_timeout: float = 30) -> Iterator[subprocess.Popen]:
    """`unlearn worker` as its own OS process, configured by the UNLEARN_* environment make_settings exported;
    stopped with SIGTERM afterwards, its log's tail printed (pytest shows it for a failing test)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service", "worker"], env=dict(os.environ), stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
    print(log_path.read_text(errors="replace")[-3000:])
