"""Structured logs: one JSON object per line on stderr, always with the process's role."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(role: str, level: str | None = None) -> structlog.stdlib.BoundLogger:
    level = (level or os.environ.get("PARLEY_LOG_LEVEL", "info")).upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(role=role, pid=os.getpid())
