"""Rate-limit syntax ("30/minute"), read by the settings at start and by the API's limiter."""

from __future__ import annotations

from dataclasses import dataclass

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}



@dataclass(frozen=True)
class Rate:
    limit: int
    period_seconds: int


def parse_rate(text: str) -> Rate:
    """'30/minute' -> Rate(30, 60). Accepts second, minute, hour, day (singular or plural)."""
    count, _, unit = text.strip().partition("/")
    unit = unit.strip().lower().removesuffix("s")
    if not count.strip().isdigit() or int(count) < 1 or unit not in PERIODS:
        raise ValueError(f"rate limit '{text}': expected 'N/second|minute|hour|day' with N >= 1")
    return Rate(int(count), PERIODS[unit])
