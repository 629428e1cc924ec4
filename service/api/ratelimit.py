"""Per-API-key rate limits: a fixed-window counter in Redis, so every API process shares one budget.

Window w = floor(now / period); counter key `unlearn:rl:{scope}:{key_id}:{w}` is INCRemented and expires
with its window. Request n of a window is refused (429) when n > limit, with Retry-After = seconds until the
window ends. A fixed window admits at most 2x the limit across a window boundary: good enough for abuse
control, and one round trip per request. Redis down: the limiter fails open (logged) rather than taking
the API down with it; the broker's own health shows in /readyz.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import lru_cache

import redis
import structlog

from service.domain.errors import TooManyRequests
from service.domain.rates import Rate

log = structlog.get_logger("unlearn.ratelimit")


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


def hit(url: str, scope: str, key_id: str, rate: Rate, now: Callable[[], float] = time.time) -> None:
    """Count one request of `key_id` in `scope`; raise TooManyRequests when over `rate`."""
    t = now()
    window = int(t // rate.period_seconds)
    counter = f"unlearn:rl:{scope}:{key_id}:{window}"
    try:
        pipe = _client(url).pipeline()
        pipe.incr(counter)
        pipe.expire(counter, rate.period_seconds + 1)
        count = int(pipe.execute()[0])
    except redis.exceptions.RedisError as exc:
        log.warning("ratelimit.unavailable", scope=scope, error=type(exc).__name__)
        return
    if count > rate.limit:
        retry_after = max(1, math.ceil((window + 1) * rate.period_seconds - t))
        raise TooManyRequests(
            f"rate limit of {rate.limit} per {rate.period_seconds}s for this API key exceeded; retry in {retry_after}s",
            headers={"Retry-After": str(retry_after)}, limit=rate.limit, period_seconds=rate.period_seconds,
        )
