"""structlog setup, done once in each process's __main__ and never at import time."""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "console", "json"]
LOG_FORMAT_ENV = "APIARY_LOG_FORMAT"
LOG_LEVEL_ENV = "APIARY_LOG_LEVEL"


def configure(component: str, fmt: str | None = None, level: str | None = None) -> None:
    """Console key=value lines on a terminal, JSON lines otherwise (or as forced).

    stdlib logging (grpc's own) goes through the same renderer so every line
    has one shape.
    """
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV, "auto")
    level_name = (level or os.environ.get(LOG_LEVEL_ENV, "info")).upper()
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level_name, logging.INFO))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component)
