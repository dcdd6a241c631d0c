"""Structured JSON logs (one object per line). Messages and extra fields are redacted; keys are never logged."""

from __future__ import annotations

import json
import logging
import sys
import time

from pipeline.redact import redact, redact_obj

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRET_FIELDS = {"authorization", "api_key", "api_keys", "key", "password", "token"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STD or key.startswith("_"):
                continue
            entry[key] = "[REDACTED]" if key.lower() in _SECRET_FIELDS else redact_obj(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the raglora loggers (idempotent)."""
    logger = logging.getLogger("raglora")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_raglora_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._raglora_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
