"""structlog JSON logs. Never log request bodies or headers: forget data and API keys must not reach a log."""

from __future__ import annotations

import logging
import sys
from typing import IO

import structlog


def configure_logging(level: str = "INFO", json: bool = True, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stderr
    logging.basicConfig(stream=stream, level=level, format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
