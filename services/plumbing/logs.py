"""structlog JSON logs on stderr, with the request id of the current call bound in."""

from __future__ import annotations

import hashlib
import logging
import sys

import structlog


def configure_logging(service: str, level: str = "info") -> None:
    """Configure structlog (and stdlib logging, which libraries use) to emit JSON lines."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"unknown log level {level!r}")
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def text_digest(text: str) -> str:
    """Short sha256 of a text, for logs: identifies it without revealing it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
