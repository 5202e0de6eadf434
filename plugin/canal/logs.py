"""Logging set-up of `canal serve`: text or JSON lines, and a bounded ring of recent records.

JSON lines (`--log-format json`) carry time, level, logger, message and the record's context
fields (anything passed with `extra=`, the process and thread), one object per line, for log
shippers. The ring keeps the last records in memory, already redacted, so `canal diagnose`
can fetch them over the socket without access to the journal or a log file.

Redaction: every known secret value (the etcd password, from the flag or its file) is replaced
by `***` in the message, the context and exception text before a record is formatted or kept;
PEM private-key blocks and credentials in URLs (scheme://user:pass@) are cut out whatever
their origin.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
from collections import deque
from typing import Any, Iterable

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d:%(threadName)s] %(message)s"
MASK = "***"
_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]+@")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S)
# LogRecord attributes that are not context: everything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class Redactor:
    """Replaces secret values in text; secrets shorter than 4 characters are not searched for
    (they would mask half the log) — config validation is where weak passwords belong."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "://" in text:
            text = _URL_CREDENTIALS.sub(rf"\1{MASK}@", text)
        return _PEM_KEY.sub("-----PRIVATE KEY REDACTED-----", text) if "PRIVATE KEY" in text else text


class RedactingFilter(logging.Filter):
    """Rewrites a record in place (message, args, exception, context) before any handler."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in context(record).items():
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


def context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def as_dict(record: logging.LogRecord) -> dict[str, Any]:
    """The JSON line's fields: fixed ones first, then context (never overriding them)."""
    stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    out: dict[str, Any] = {
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname,
        "logger": record.name,
        "message": record.getMessage(),
        "process": record.process,
        "thread": record.threadName,
    }
    if record.exc_text:
        out["exception"] = record.exc_text
    elif record.exc_info:
        out["exception"] = logging.Formatter().formatException(record.exc_info)
    for key, value in context(record).items():
        out.setdefault(key, value if isinstance(value, (str, int, float, bool, type(None))) else repr(value))
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(as_dict(record), default=str)


class Ring(logging.Handler):
    """The last `size` records as dicts (as_dict), for `canal diagnose`."""

    def __init__(self, size: int = 2000) -> None:
        super().__init__()
        self._records: deque[dict[str, Any]] = deque(maxlen=size)
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = as_dict(record)
        except Exception:  # a log line must never break the caller
            return
        with self._ring_lock:
            self._records.append(entry)

    def records(self) -> list[dict[str, Any]]:
        with self._ring_lock:
            return list(self._records)


RING = Ring()


def setup(level: str, fmt: str = "text", secrets: Iterable[str] = (), stream: Any = None) -> None:
    """Configure the root logger: one stream handler in `fmt`, the ring, and redaction first.
    gunicorn's own loggers propagate to it (errorlog "-" adds its own handler: see serve)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    redact = RedactingFilter(Redactor(secrets))
    for h in (handler, RING):
        h.filters = [f for f in h.filters if not isinstance(f, RedactingFilter)]
        h.addFilter(redact)  # on the handlers: records of every logger pass them
        root.addHandler(h)
    root.setLevel(level)
