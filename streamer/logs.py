"""Logging set-up: plain text for a terminal, or one JSON object per line for a collector.

(What a log line must never show, a token, is redacted where access lines are made, in
app.py's AccessLogger.)"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from streamer.config import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line; an access log line also carries its fields separately."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry: dict[str, Any] = {
            "time": at.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which worker, under --workers
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(settings: Settings) -> None:
    """Every record to stderr, in STREAMER_LOG_FORMAT at STREAMER_LOG_LEVEL."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        text = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
