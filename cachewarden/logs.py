"""structlog, configured once per process; the stdlib (and Celery's) loggers bridged in.

JSON lines when stderr is not a terminal (production), readable console
output in a terminal. `CACHEWARDEN_LOG_FORMAT=json|console` forces one.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False

# Loggers that write a line per routine event at INFO, quieted to WARNING unless the
# level is DEBUG: APScheduler logs "Running job" and "executed successfully" for every
# run of the write-behind dispatcher (every 100 ms by default), about 20 lines a second.
# Its warnings (a missed run, a job that raised) still show.
_CHATTY = ("apscheduler",)


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Configure structlog and route every stdlib logger through it (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    fmt = (
        fmt
        or os.environ.get("CACHEWARDEN_LOG_FORMAT")
        or ("console" if sys.stderr.isatty() else "json")
    )
    level = (level or os.environ.get("CACHEWARDEN_LOG_LEVEL") or "INFO").upper()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
