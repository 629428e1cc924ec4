"""Version-change hints over Redis pub/sub. The database stays the truth: subscribers also poll it."""

from __future__ import annotations

import redis
import structlog

from service.domain.broker import configured_redis_url
from service.domain.settings import Settings

CHANNEL = "unlearn:active-version"
log = structlog.get_logger("unlearn")


def announce_version(settings: Settings, version: int) -> None:
    url = configured_redis_url(settings)
    if url is None:
        return
    try:
        redis.Redis.from_url(url, socket_timeout=3).publish(CHANNEL, str(version))
    except redis.exceptions.RedisError as exc:  # a lost hint only delays the swap until the next poll
        log.warning("version.announce_failed", version=version, error=str(exc))
