"""Structured (JSON lines) logging, configured once by each process entry point."""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

from shared.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
turn_id_var: ContextVar[str | None] = ContextVar("turn_id", default=None)

# A caller's X-Request-ID is kept only if it is short and made of safe characters:
# it is echoed in a header, written to every log line and forwarded to tasks.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def sane_request_id(value: object) -> str | None:
    """``value`` if it is an acceptable request id, else ``None``."""
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            payload["request_id"] = request_id
        turn_id = turn_id_var.get()
        if turn_id:
            payload["turn_id"] = turn_id
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(settings: Settings) -> None:
    root = logging.getLogger()
    if any(getattr(h, "_tollgate", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._tollgate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level)
